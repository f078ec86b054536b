"""Taking over kube-proxy's nftables mode in place: a node whose `ip kube-proxy` table was written
by upstream (an anonymous verdict map per service, here pointing at a pod that is gone) is
rewritten by kproxy's first sync in one transaction, and traffic reaches the current endpoint."""

from __future__ import annotations

from integration.conftest import Cluster
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
GONE = "192.168.7.7"  # the endpoint upstream's table still sends to

UPSTREAM_TABLE = f"""
table ip kube-proxy {{
    comment "rules for kube-proxy"
    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ {VIP} . tcp . {PORT} : goto service-ABCDEFGH-default-web-tcp-p }}
    }}
    chain nat-prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump services
    }}
    chain nat-output {{
        type nat hook output priority -100; policy accept;
        jump services
    }}
    chain services {{
        ip daddr . meta l4proto . th dport vmap @service-ips
    }}
    chain service-ABCDEFGH-default-web-tcp-p {{
        numgen random mod 1 vmap {{ 0 : goto endpoint-IJKLMNOP-default-web-tcp-p-gone }}
    }}
    chain endpoint-IJKLMNOP-default-web-tcp-p-gone {{
        meta l4proto tcp dnat to {GONE}:{TARGET}
    }}
}}
"""


def test_upstreams_table_is_taken_over_in_place(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, [web], TARGET)
    script = cluster.manifests.parent / "upstream.nft"
    script.write_text(UPSTREAM_TABLE)
    cluster.node.run("nft", "-f", str(script))
    stale = probe(client.ns, VIP, PORT, "tcp", count=3, timeout=1.0)

    cluster.mode = "nftables"
    summary = cluster.sync()
    result = probe(client.ns, VIP, PORT, "tcp", count=20)
    table = cluster.node.run("nft", "list", "table", "ip", "kube-proxy").stdout

    assert stale.answered == 0, stale  # upstream's rules sent it to the pod that is gone
    assert result.failed == 0 and result.answers == {"web-1": 20}, (summary, result)
    assert GONE not in table and "IJKLMNOP" not in table, table
    assert "192.168.1.10" in table
    assert "no changes" in cluster.sync()  # kproxy's own table now
