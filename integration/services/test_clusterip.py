"""ClusterIP services with real traffic: balancing, rejection, affinity and endpoint changes."""

from __future__ import annotations

import pytest

from integration.conftest import Cluster, both_modes
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080

pytestmark = both_modes  # every test here, in the iptables and the nftables mode


def test_tcp_clusterip_reaches_every_endpoint_evenly(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2, 3)]
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, backends, TARGET)
    cluster.sync()

    result = probe(client.ns, VIP, PORT, "tcp", count=300)

    assert result.failed == 0, result
    assert set(result.answers) == {"web-1", "web-2", "web-3"}
    # Each gets 100 on average (sd ~8); 60 is five standard deviations away.
    assert all(n >= 60 for n in result.answers.values()), result.answers


def test_udp_clusterip_reaches_every_endpoint_evenly(cluster: Cluster) -> None:
    backends = [cluster.backend(f"dns-{i}", f"192.168.{i}.53", 53, "udp") for i in (1, 2)]
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("dns", VIP, 53, backends, 53, protocol="UDP")
    cluster.sync()

    result = probe(client.ns, VIP, 53, "udp", count=300)

    assert result.failed == 0, result
    assert set(result.answers) == {"dns-1", "dns-2"}
    assert all(n >= 75 for n in result.answers.values()), result.answers


@pytest.mark.parametrize(
    ("proto", "from_node"),
    [("tcp", False), ("udp", False), ("tcp", True)],
    ids=["tcp-from-pod", "udp-from-pod", "tcp-from-node"],
)
def test_service_without_endpoints_is_refused_at_once(
    cluster: Cluster, proto: str, from_node: bool
) -> None:
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("empty", VIP, PORT, [], TARGET, protocol=proto.upper())
    cluster.sync()

    result = probe(cluster.node if from_node else client.ns, VIP, PORT, proto, count=3)

    # REJECT answers with ICMP port-unreachable: refused, not left to time out.
    assert result.refused == 3, result


def test_client_ip_affinity_keeps_a_client_on_one_endpoint(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    clients = [cluster.pod(f"client-{i}", f"192.168.9.{i}") for i in (1, 2)]
    cluster.service("sticky", VIP, PORT, backends, TARGET, affinity=True)
    cluster.sync()

    for client in clients:
        result = probe(client.ns, VIP, PORT, "tcp", count=40)
        assert result.failed == 0, result
        # Without affinity, 40 connections all landing on one of two endpoints: p = 2e-12.
        assert len(result.answers) == 1, f"{client.name} was spread over {result.answers}"


def test_removed_endpoint_gets_no_more_traffic_after_resync(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, backends, TARGET)
    cluster.sync()
    before = probe(client.ns, VIP, PORT, "tcp", count=40)
    assert set(before.answers) == {"web-1", "web-2"}, before

    cluster.service("web", VIP, PORT, backends[:1], TARGET)
    summary = cluster.sync()
    after = probe(client.ns, VIP, PORT, "tcp", count=100)

    assert "no changes" not in summary, summary
    assert after.answers == {"web-1": 100}, after
