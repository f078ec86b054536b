"""externalIPs and LoadBalancer ingress IPs, reached from beyond the node, and
loadBalancerSourceRanges: who may use the load balancer's address, and who may not."""

from __future__ import annotations

import pytest

from integration.conftest import Cluster, both_modes
from integration.netns import NODE_IP, OUTSIDE_IP
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
NODE_PORT = 30080
# Addresses the node does not hold: the outside namespaces' default routes point at the node, as a
# router in front of a real node sends it the externalIPs and load-balancer VIPs.
EXTERNAL_IP = "203.0.113.10"
LB_IP = "203.0.113.20"
FAR_IP, NODE_IP_2 = "172.31.1.1", "172.31.1.2"

pytestmark = both_modes  # every test here, in the iptables and the nftables mode


def test_external_ip_reaches_the_endpoints(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    cluster.service("web", VIP, PORT, backends, TARGET, external_ips=[EXTERNAL_IP])
    cluster.sync()

    result = probe(cluster.outside, EXTERNAL_IP, PORT, "tcp", count=30)
    wrong_port = probe(cluster.outside, EXTERNAL_IP, TARGET, "tcp", count=1)

    assert result.failed == 0, result
    assert set(result.answers) == {"web-1", "web-2"}, result
    assert result.sources == {NODE_IP: 30}, result  # externalTrafficPolicy Cluster masquerades
    # Only the service's port is DNATed; anything else to that address is routed on, back out
    # of the node (nobody holds it), and never reaches a backend.
    assert wrong_port.answered == 0, wrong_port


def test_external_ip_without_endpoints_is_refused(cluster: Cluster) -> None:
    cluster.service("web", VIP, PORT, [], TARGET, external_ips=[EXTERNAL_IP])
    cluster.sync()

    result = probe(cluster.outside, EXTERNAL_IP, PORT, "tcp", count=2)

    assert result.refused == 2, result


# A range padded with a space is one the API server accepts and kube-proxy trims.
@pytest.mark.parametrize("source_range", [f"{OUTSIDE_IP}/32", f" {OUTSIDE_IP}/32 "])
def test_load_balancer_source_ranges_admit_only_listed_clients(
    cluster: Cluster, source_range: str
) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    far = cluster.add_outside("far", FAR_IP, NODE_IP_2)
    cluster.service(
        "web",
        VIP,
        PORT,
        [web],
        TARGET,
        node_port=NODE_PORT,
        load_balancer_ips=[LB_IP],
        source_ranges=[source_range],
    )
    cluster.sync()

    allowed = probe(cluster.outside, LB_IP, PORT, "tcp", count=3)
    denied = probe(far, LB_IP, PORT, "tcp", count=2, timeout=1.0)
    node_port = probe(far, NODE_IP_2, NODE_PORT, "tcp", count=3)

    assert allowed.answers == {"web-1": 3}, allowed
    assert allowed.sources == {NODE_IP: 3}, allowed
    # KUBE-PROXY-FIREWALL drops what KUBE-FW did not let through: no answer at all, not a
    # refusal.
    assert denied.timeout == 2, denied
    # Source ranges guard the load balancer's address only; the NodePort stays open to all, as
    # upstream kube-proxy does.
    assert node_port.answers == {"web-1": 3}, node_port
    assert "no changes" in cluster.sync()


def test_load_balancer_without_source_ranges_admits_everyone(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    far = cluster.add_outside("far", FAR_IP, NODE_IP_2)
    cluster.service("web", VIP, PORT, [web], TARGET, node_port=NODE_PORT, load_balancer_ips=[LB_IP])
    cluster.sync()

    for client in (cluster.outside, far):
        result = probe(client, LB_IP, PORT, "tcp", count=3)
        assert result.answers == {"web-1": 3}, (client.name, result)
