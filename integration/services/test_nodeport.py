"""NodePort services with real traffic from beyond the node: every node address, localhost.

Each test runs in both proxy modes, but the last (route_localnet is the iptables mode's alone).
Where the nftables mode differs on purpose (docs/nftables-mode.md: no localhost NodePorts, and
NodePorts on the node's primary addresses when nodePortAddresses is unset), so does the
expectation."""

from __future__ import annotations

import pytest

from integration.conftest import Cluster, both_modes
from integration.netns import NODE_IP, OUTSIDE_IP
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
NODE_PORT = 30080
# A second client beyond the node, on a link of its own that gives the node a second address.
FAR_IP, NODE_IP_2 = "172.31.1.1", "172.31.1.2"
ROUTE_LOCALNET = "/proc/sys/net/ipv4/conf/all/route_localnet"


@both_modes
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_nodeport_answers_on_node_addresses_masqueraded(cluster: Cluster, proto: str) -> None:
    """nodePortAddresses unset: the iptables mode answers on every node address, the nftables
    mode on the Node's InternalIP (its primary address) only."""
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET, proto) for i in (1, 2)]
    cluster.add_outside("far", FAR_IP, NODE_IP_2)
    cluster.service("web", VIP, PORT, backends, TARGET, protocol=proto.upper(), node_port=NODE_PORT)
    cluster.node_object(internal_ips=[NODE_IP])
    cluster.sync()
    answering = (NODE_IP,) if cluster.mode == "nftables" else (NODE_IP, NODE_IP_2)

    if cluster.mode == "nftables":
        # Not DNATed on the second address: the node's own stack, where nothing listens, refuses.
        elsewhere = probe(cluster.outside, NODE_IP_2, NODE_PORT, proto, count=2)
        assert elsewhere.refused == 2, elsewhere
    for node_ip in answering:
        result = probe(cluster.outside, node_ip, NODE_PORT, proto, count=30)

        assert result.failed == 0, (node_ip, result)
        # 30 attempts all on one of two endpoints: p = 2e-9.
        assert set(result.answers) == {"web-1", "web-2"}, (node_ip, result)
        # externalTrafficPolicy Cluster: the node masquerades, so the reply comes back through
        # it; the backend sees the node's address (the one on its route to the pod), never the
        # client's.
        assert result.sources == {NODE_IP: 30}, (node_ip, result)


@both_modes
def test_nodeport_on_localhost_from_the_node(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.service("web", VIP, PORT, [web], TARGET, node_port=NODE_PORT)
    assert cluster.node.run("cat", ROUTE_LOCALNET).stdout.strip() == "0"
    cluster.sync()

    result = probe(cluster.node, "127.0.0.1", NODE_PORT, "tcp", count=3)

    if cluster.mode == "nftables":
        # No localhost NodePorts in the nftables mode, so no route_localnet either: nothing
        # listens on 127.0.0.1, and the node's own stack refuses.
        assert result.refused == 3, result
        assert cluster.node.run("cat", ROUTE_LOCALNET).stdout.strip() == "0"
        return
    # kproxy turned on route_localnet in the node's namespace (only there): without it the
    # kernel drops packets to 127.0.0.1 that are DNATed to a pod.
    assert cluster.node.run("cat", ROUTE_LOCALNET).stdout.strip() == "1"
    assert result.answers == {"web-1": 3}, result
    assert result.sources == {NODE_IP: 3}, result  # masqueraded away from 127.0.0.1


@both_modes
def test_localhost_nodeports_off_leaves_localhost_alone(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.service("web", VIP, PORT, [web], TARGET, node_port=NODE_PORT)
    cluster.configure(localhost_nodeports=False)
    cluster.sync()

    on_localhost = probe(cluster.node, "127.0.0.1", NODE_PORT, "tcp", count=2)
    on_node_ip = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=2)

    # Nothing listens on the node port itself: the node's own TCP stack refuses.
    assert on_localhost.refused == 2, on_localhost
    assert cluster.node.run("cat", ROUTE_LOCALNET).stdout.strip() == "0"
    assert on_node_ip.answers == {"web-1": 2}, on_node_ip


@both_modes
def test_nodeport_and_cluster_ip_of_one_service_agree(cluster: Cluster) -> None:
    """The same endpoints behind both entries; a client pod reaching the ClusterIP is not
    masqueraded (no clusterCIDR configured), an outside client reaching the NodePort is."""
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, [web], TARGET, node_port=NODE_PORT)
    cluster.sync()

    via_vip = probe(client.ns, VIP, PORT, "tcp", count=3)
    via_node_port = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=3)

    assert via_vip.sources == {"192.168.9.9": 3}, via_vip
    assert via_node_port.sources == {NODE_IP: 3}, via_node_port
    assert OUTSIDE_IP not in via_node_port.sources
    assert "no changes" in cluster.sync()


@both_modes
@pytest.mark.parametrize(
    ("addresses", "internal_ips", "open_on", "closed_on"),
    [
        pytest.param(["172.31.1.0/24"], [], NODE_IP_2, NODE_IP, id="cidr"),
        pytest.param(["primary"], [NODE_IP], NODE_IP, NODE_IP_2, id="primary"),
    ],
)
def test_node_port_addresses_narrow_where_node_ports_answer(
    cluster: Cluster,
    addresses: list[str],
    internal_ips: list[str],
    open_on: str,
    closed_on: str,
) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.add_outside("far", FAR_IP, NODE_IP_2)
    cluster.service("web", VIP, PORT, [web], TARGET, node_port=NODE_PORT)
    cluster.node_object(internal_ips=internal_ips)
    cluster.configure(node_port_addresses=addresses)
    cluster.sync()

    open_port = probe(cluster.outside, open_on, NODE_PORT, "tcp", count=2)
    closed_port = probe(cluster.outside, closed_on, NODE_PORT, "tcp", count=2)
    localhost = probe(cluster.node, "127.0.0.1", NODE_PORT, "tcp", count=1)

    assert open_port.answers == {"web-1": 2}, open_port
    # Not DNATed there: the node's own stack, where nothing listens, refuses.
    assert closed_port.refused == 2, closed_port
    assert localhost.refused == 1, localhost  # 127.0.0.1 is not in the list either
    assert "no changes" in cluster.sync()


@both_modes
def test_client_ip_affinity_holds_through_a_node_port(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    cluster.service("web", VIP, PORT, backends, TARGET, affinity=True, node_port=NODE_PORT)
    cluster.sync()

    result = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=30)

    assert result.failed == 0, result
    # Without affinity, 30 connections all landing on one of two endpoints: p = 2e-9.
    assert len(result.answers) == 1, result


# The iptables mode only: route_localnet and KUBE-FIREWALL are its own (the nftables mode never
# turns route_localnet on, test_nodeport_on_localhost_from_the_node).
def test_cleanup_leaves_route_localnet_on_and_says_so(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.service("web", VIP, PORT, [web], TARGET, node_port=NODE_PORT)
    cluster.sync()

    said = cluster.kproxy("cleanup").splitlines()

    assert said[0].startswith("removed ") and said[1].startswith(
        "left net.ipv4.conf.all.route_localnet=1"
    ), said
    assert cluster.node.run("cat", ROUTE_LOCALNET).stdout.strip() == "1"
    # The guard that makes it safe stays (kubelet's chain as much as kproxy's).
    assert ":KUBE-FIREWALL" in cluster.save()
    cluster.node.run("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=0")
    assert len(cluster.kproxy("cleanup").splitlines()) == 1  # nothing to say when it is off
