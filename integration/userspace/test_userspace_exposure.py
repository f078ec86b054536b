"""The userspace mode serves only what came through its portals (issue 19): a host that dials a
relay port straight gets nothing, even for a ClusterIP-only service, and a LoadBalancer's
loadBalancerSourceRanges are honoured as the iptables mode's firewall chain honours them (the
NodePort bypasses them, as upstream's)."""

from __future__ import annotations

import re

import pytest

from integration.conftest import Cluster
from integration.netns import NODE_IP
from integration.traffic import probe
from integration.userspace.test_userspace import userspace_proxy

VIP = "10.96.100.30"
LB_IP = "203.0.113.10"
PORT = 80
TARGET = 8080
NODE_PORT = 30090
ALLOWED = "192.0.2.0/24"


def _proxy_port(cluster: Cluster, vip: str) -> int:
    """The relay port the container portal of `vip` DNATs to."""
    nat = cluster.node.run("iptables-legacy-save", "-t", "nat").stdout
    found = re.search(
        rf"-A KUBE-PORTALS-CONTAINER -d {vip}/32 .* --to-destination [\d.]+:(\d+)", nat
    )
    assert found, nat
    return int(found.group(1))


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_relay_port_dialled_straight_from_off_the_node_gets_nothing(
    cluster: Cluster, proto: str
) -> None:
    # A ClusterIP-only service: nothing beyond the node may reach its endpoints.
    admin = cluster.backend("internal-admin", "192.168.1.10", TARGET, proto)
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("internal-admin", VIP, PORT, [admin], TARGET, protocol=proto.upper())
    with userspace_proxy(cluster):
        port = _proxy_port(cluster, VIP)
        straight = probe(cluster.outside, NODE_IP, port, proto, count=3, timeout=1.0)
        portal = probe(client.ns, VIP, PORT, proto, count=3)
    assert straight.answered == 0, straight
    assert portal.answers == {"internal-admin": 3}, portal  # the portal still leads there


def test_load_balancer_source_ranges_admit_only_their_sources(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    allowed = cluster.add_outside("allowed", "192.0.2.5", "192.0.2.1")
    cluster.service(
        "web",
        VIP,
        PORT,
        [web],
        TARGET,
        node_port=NODE_PORT,
        load_balancer_ips=[LB_IP],
        source_ranges=[ALLOWED],
    )
    with userspace_proxy(cluster):
        outsider = probe(cluster.outside, LB_IP, PORT, "tcp", count=3, timeout=1.0)
        inside = probe(allowed, LB_IP, PORT, "tcp", count=3)
        node_port = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=3)
    assert outsider.answered == 0, outsider  # 172.31.0.1 is outside 192.0.2.0/24
    assert inside.answers == {"web-1": 3}, inside
    assert node_port.answers == {"web-1": 3}, node_port  # NodePorts ignore the ranges
