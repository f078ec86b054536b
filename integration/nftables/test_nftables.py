"""The nftables mode with real traffic: one `kube-proxy` table per family, written over netlink.
What both kernel modes share (ClusterIP balance, NodePorts, masquerade, hairpin, REJECT, affinity)
runs in both from the suite's `both_modes` tests; this file holds what is the nftables mode's own.

Each test runs kproxy (`mode: nftables`) in its own node namespace; see conftest.py. The oracle
test checks the netlink writer against `nft -f` of the rendered text."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from integration.conftest import Cluster
from integration.netns import NODE_IP, NODE_IP6, Namespace
from integration.traffic import ProbeResult, probe

VIP, VIP6 = "10.96.100.10", "fd00:96::10"
PORT = 80
TARGET = 8080
NODE_PORT = 30080
CLIENT_IP, CLIENT_IP6 = "192.168.9.9", "fd00:168:9::9"
CLUSTER_CIDR = "192.168.0.0/16"


@pytest.fixture
def nft_cluster(cluster: Cluster) -> Iterator[Cluster]:
    cluster.mode = "nftables"
    yield cluster


def nft(ns: Namespace, *args: str) -> str:
    return ns.run("nft", *args).stdout


def nft_json(ns: Namespace, family: str = "ip") -> list[dict[str, object]]:
    """`nft -j list table FAMILY kube-proxy`, without handles (they differ between loads)."""
    doc = json.loads(nft(ns, "-j", "list", "table", family, "kube-proxy"))
    return [_without_handles(item) for item in doc["nftables"] if "metainfo" not in item]


def _without_handles(item: dict[str, object]) -> dict[str, object]:
    ((kind, body),) = item.items()
    assert isinstance(body, dict)
    clean = {k: v for k, v in body.items() if k != "handle"}
    if isinstance(clean.get("elem"), list):
        clean["elem"] = sorted(clean["elem"], key=json.dumps)
    return {kind: clean}


FOREIGN_TABLE = """table inet bystander {
\tset watched {
\t\ttype ipv4_addr
\t\telements = { 10.96.100.10 }
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tip saddr 203.0.113.7 drop
\t}
}
"""


def test_foreign_change_is_repaired_and_other_tables_are_untouched(nft_cluster: Cluster) -> None:
    node = nft_cluster.node
    node.run("nft", "-f", "-", input=FOREIGN_TABLE)
    backends = [nft_cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = nft_cluster.pod("client", CLIENT_IP)
    nft_cluster.service("web", VIP, PORT, backends, TARGET)
    nft_cluster.sync()
    written = nft_json(node)
    # Another program breaks kproxy's table: drops the service map's element, adds a rule and
    # a chain of its own.
    node.run("nft", "flush", "map", "ip", "kube-proxy", "service-ips")
    node.run("nft", "insert", "rule", "ip", "kube-proxy", "services", "drop")
    node.run("nft", "add", "chain", "ip", "kube-proxy", "intruder")
    assert probe(client.ns, VIP, PORT, "tcp", count=2).answered == 0

    summary = nft_cluster.sync()

    assert nft_json(node) == written, summary
    assert probe(client.ns, VIP, PORT, "tcp", count=10).failed == 0
    assert nft(node, "list", "table", "inet", "bystander") == FOREIGN_TABLE
    # A second sync finds nothing to do.
    assert "no changes" in nft_cluster.sync()


# kubelet's chains (integration/real_node.py seeds them where kubelet writes): KUBE-FIREWALL
# guards route_localnet, which kproxy never turns off, and the hint and canary chains tell
# which backend kubelet uses. No mode and no cleanup deletes them.
KUBELET_CHAINS = (":KUBE-FIREWALL ", ":KUBE-IPTABLES-HINT ", ":KUBE-KUBELET-CANARY ")


def _kube_chains(cluster: Cluster) -> list[str]:
    """kproxy's iptables-mode chains, in the backend the iptables mode writes."""
    return [
        line
        for line in cluster.save().splitlines()
        if line.startswith(":KUBE-") and not line.startswith(KUBELET_CHAINS)
    ]


def _tables(ns: Namespace) -> str:
    return nft(ns, "list", "tables")


def test_switching_iptables_nftables_iptables_leaves_no_leftovers(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", CLIENT_IP)
    cluster.service("web", VIP, PORT, backends, TARGET, node_port=NODE_PORT)
    cluster.sync()
    assert _kube_chains(cluster), "the iptables mode wrote no KUBE- chains"

    cluster.mode = "nftables"
    cluster.configure()
    cluster.sync()

    assert _kube_chains(cluster) == []
    assert "table ip kube-proxy" in _tables(cluster.node)
    assert probe(client.ns, VIP, PORT, "tcp", count=20).failed == 0
    assert probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=5).failed == 0

    cluster.mode = "iptables"
    cluster.configure()
    cluster.sync()

    assert "kube-proxy" not in _tables(cluster.node)
    assert _kube_chains(cluster)
    assert probe(client.ns, VIP, PORT, "tcp", count=20).failed == 0


def test_switching_modes_under_a_client_loop_fails_no_connection(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", CLIENT_IP)
    cluster.service("web", VIP, PORT, backends, TARGET)
    cluster.sync()
    results: list[ProbeResult] = []
    loop = threading.Thread(
        target=lambda: results.append(probe(client.ns, VIP, PORT, "tcp", count=600))
    )
    loop.start()
    try:
        for mode in ("nftables", "iptables", "nftables"):
            cluster.mode = mode
            cluster.configure()
            cluster.sync()
    finally:
        loop.join()

    assert results[0].failed == 0, results[0]
    assert set(results[0].answers) == {"web-1", "web-2"}, results[0]


def test_cleanup_removes_both_tables(nft_cluster: Cluster) -> None:
    nft_cluster.topo.enable_ipv6()
    web = nft_cluster.backend("web-1", "192.168.1.10", TARGET, ip6="fd00:168:1::10")
    nft_cluster.service("web", VIP, PORT, [web], TARGET, cluster_ip6=VIP6)
    nft_cluster.sync()
    assert "table ip6 kube-proxy" in _tables(nft_cluster.node)

    nft_cluster.kproxy("cleanup")

    assert "kube-proxy" not in _tables(nft_cluster.node)


def test_both_families_carry_traffic(nft_cluster: Cluster) -> None:
    nft_cluster.topo.enable_ipv6()
    backends = [
        nft_cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET, ip6=f"fd00:168:{i}::10")
        for i in (1, 2)
    ]
    nft_cluster.service("web", VIP, PORT, backends, TARGET, node_port=NODE_PORT, cluster_ip6=VIP6)
    client = nft_cluster.topo.add_pod("client", CLIENT_IP, CLIENT_IP6)
    nft_cluster.sync()

    over_v6 = probe(client.ns, VIP6, PORT, "tcp", count=30)
    node_port_v6 = probe(nft_cluster.outside, NODE_IP6, NODE_PORT, "tcp", count=10)
    over_v4 = probe(client.ns, VIP, PORT, "tcp", count=10)

    assert set(over_v6.answers) == {"web-1", "web-2"}, over_v6
    assert over_v6.sources == {CLIENT_IP6: 30}, over_v6
    assert node_port_v6.failed == 0 and node_port_v6.sources == {NODE_IP6: 10}, node_port_v6
    assert over_v4.failed == 0, over_v4
