"""Packet outcomes docs/modes.md lists between the modes. The node's
own connection to an `externalTrafficPolicy: Local` external IP or LoadBalancer IP whose service
has endpoints only on other nodes is sent to one of them, masqueraded (the iptables mode's
KUBE-EXT short-circuit; upstream's nftables mode since kubernetes#132456, whose filter checks run
after DNAT), while the same address from beyond the node is dropped. And the userspace mode
answers a NodePort on 127.0.0.1, as the iptables mode does and the nftables mode does not."""

from __future__ import annotations

import pytest

from integration.conftest import Cluster, both_modes
from integration.netns import NODE_IP
from integration.traffic import probe
from integration.userspace.test_userspace import userspace_proxy

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
EXTERNAL_IP = "203.0.113.10"
LB_IP = "203.0.113.20"


@both_modes
@pytest.mark.parametrize("address", [EXTERNAL_IP, LB_IP], ids=["external-IP", "LB-IP"])
def test_node_reaches_local_policy_address_without_local_endpoint(
    cluster: Cluster, address: str
) -> None:
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    cluster.service(
        "web",
        VIP,
        PORT,
        [remote],
        TARGET,
        node_port=30080,
        external_ips=[EXTERNAL_IP],
        load_balancer_ips=[LB_IP],
        external_policy="Local",
        health_check_node_port=32100,
        remote=[remote.name],
    )
    cluster.sync()

    from_node = probe(cluster.node, address, PORT, "tcp", count=3)
    from_outside = probe(cluster.outside, address, PORT, "tcp", timeout=1.0)

    assert from_node.answers == {"web-2": 3}, from_node
    assert from_node.sources == {NODE_IP: 3}, from_node
    assert from_outside.sequence == ["timeout"], from_outside
    assert "no changes" in cluster.sync()


def test_userspace_answers_a_node_port_on_localhost(cluster: Cluster) -> None:
    """The userspace mode's host portal takes a NodePort on any local address, 127.0.0.1 too
    (as the iptables mode with localhostNodePorts; the nftables mode has none)."""
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.service("web", VIP, PORT, [web], TARGET, node_port=30080)
    with userspace_proxy(cluster):
        result = probe(cluster.node, "127.0.0.1", 30080, "tcp", count=3)
    assert result.answers == {"web-1": 3}, result
