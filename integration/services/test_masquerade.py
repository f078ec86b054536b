"""Which source address a backend sees: the client's own, or the node's when masqueraded."""

from __future__ import annotations

import pytest

from integration.conftest import Cluster, both_modes
from integration.netns import NODE_IP, OUTSIDE_IP
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
CLUSTER_CIDR = "192.168.0.0/16"
CLIENT_IP = "192.168.9.9"

pytestmark = both_modes  # every test here, in the iptables and the nftables mode


def test_hairpin_pod_reaches_itself_through_its_service_masqueraded(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.service("web", VIP, PORT, [web], TARGET)
    cluster.sync()

    result = probe(web.ns, VIP, PORT, "tcp", count=5)

    assert result.answers == {"web-1": 5}, result
    # Unmasqueraded, the pod would answer its own address directly and the reply would never
    # match the connection; kproxy marks hairpin traffic, so the pod sees the node instead.
    assert result.sources == {NODE_IP: 5}, result


@pytest.mark.parametrize(
    ("client", "cluster_cidr", "masquerade_all", "seen"),
    [
        pytest.param("pod", CLUSTER_CIDR, False, CLIENT_IP, id="pod-in-cluster-cidr"),
        pytest.param("pod", None, False, CLIENT_IP, id="pod-no-cluster-cidr"),
        pytest.param("outside", CLUSTER_CIDR, False, NODE_IP, id="outside-cluster-cidr"),
        pytest.param("outside", None, False, OUTSIDE_IP, id="outside-no-cluster-cidr"),
        pytest.param("pod", CLUSTER_CIDR, True, NODE_IP, id="pod-masquerade-all"),
        pytest.param("node", CLUSTER_CIDR, False, NODE_IP, id="node-itself"),
    ],
)
def test_backend_sees_client_address_unless_masqueraded(
    cluster: Cluster, client: str, cluster_cidr: str | None, masquerade_all: bool, seen: str
) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    pod = cluster.pod("client", CLIENT_IP)
    cluster.service("web", VIP, PORT, [web], TARGET)
    cluster.configure(cluster_cidr=cluster_cidr, masquerade_all=masquerade_all)
    cluster.sync()
    source = {"pod": pod.ns, "outside": cluster.outside, "node": cluster.node}[client]

    result = probe(source, VIP, PORT, "tcp", count=3)

    assert result.answers == {"web-1": 3}, result
    assert result.sources == {seen: 3}, result


def test_udp_from_outside_the_cluster_cidr_is_masqueraded(cluster: Cluster) -> None:
    dns = cluster.backend("dns-1", "192.168.1.53", 53, "udp")
    pod = cluster.pod("client", CLIENT_IP)
    cluster.service("dns", VIP, 53, [dns], 53, protocol="UDP")
    cluster.configure(cluster_cidr=CLUSTER_CIDR)
    cluster.sync()

    from_pod = probe(pod.ns, VIP, 53, "udp", count=3)
    from_outside = probe(cluster.outside, VIP, 53, "udp", count=3)

    assert from_pod.sources == {CLIENT_IP: 3}, from_pod
    assert from_outside.sources == {NODE_IP: 3}, from_outside
