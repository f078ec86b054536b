"""Dual-stack: kproxy programs ip6tables (from a process of its own) alongside iptables, or the
`ip6 kube-proxy` table beside `ip kube-proxy` in the nftables mode, and IPv6 traffic reaches the
endpoints of an IPv6 ClusterIP and NodePort. Every test runs in both modes."""

from __future__ import annotations

import re

import pytest

from integration.conftest import Cluster, both_modes
from integration.netns import NODE_IP, NODE_IP6, OUTSIDE_IP6
from integration.traffic import probe

VIP, VIP6 = "10.96.100.10", "fd00:96::10"
PORT = 80
TARGET = 8080
NODE_PORT = 30080
CLIENT_IP, CLIENT_IP6 = "192.168.9.9", "fd00:168:9::9"

pytestmark = both_modes


def _dual_stack_service(cluster: Cluster) -> None:
    cluster.topo.enable_ipv6()
    backends = [
        cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET, ip6=f"fd00:168:{i}::10")
        for i in (1, 2)
    ]
    cluster.service("web", VIP, PORT, backends, TARGET, node_port=NODE_PORT, cluster_ip6=VIP6)


def test_ipv6_cluster_ip_from_a_dual_stack_pod(cluster: Cluster) -> None:
    _dual_stack_service(cluster)
    client = cluster.topo.add_pod("client", CLIENT_IP, CLIENT_IP6)
    cluster.sync()

    over_v6 = probe(client.ns, VIP6, PORT, "tcp", count=30)
    over_v4 = probe(client.ns, VIP, PORT, "tcp", count=10)

    assert over_v6.failed == 0, over_v6
    assert set(over_v6.answers) == {"web-1", "web-2"}, over_v6
    assert over_v6.sources == {CLIENT_IP6: 30}, over_v6  # a pod is not masqueraded
    assert over_v4.failed == 0 and over_v4.sources == {CLIENT_IP: 10}, over_v4


def test_ipv6_node_port_from_outside_is_masqueraded(cluster: Cluster) -> None:
    _dual_stack_service(cluster)
    cluster.sync()

    over_v6 = probe(cluster.outside, NODE_IP6, NODE_PORT, "tcp", count=30)
    over_v4 = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=5)
    on_localhost6 = probe(cluster.node, "::1", NODE_PORT, "tcp", count=1)

    assert over_v6.failed == 0, over_v6
    assert set(over_v6.answers) == {"web-1", "web-2"}, over_v6
    assert over_v6.sources == {NODE_IP6: 30}, over_v6
    assert OUTSIDE_IP6 not in over_v6.sources
    assert over_v4.sources == {NODE_IP: 5}, over_v4
    # Localhost NodePorts are IPv4 only (upstream excludes ::1): nothing listens, so refused.
    assert on_localhost6.sequence == ["refused"], on_localhost6


@pytest.mark.parametrize(
    "node_port_addresses", [["172.31.0.0/24"], ["fd00:31::/64"]], ids=["ipv4-cidr", "ipv6-cidr"]
)
def test_node_port_addresses_of_one_family_leave_the_other_on_every_address(
    cluster: Cluster, node_port_addresses: list[str]
) -> None:
    """Upstream (NewNodePortAddresses): a family without CIDRs in nodePortAddresses gets the zero
    CIDR, "even if there are CIDRs of the other family"."""
    _dual_stack_service(cluster)
    cluster.configure(node_port_addresses=node_port_addresses)
    cluster.sync()

    over_v4 = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=2)
    over_v6 = probe(cluster.outside, NODE_IP6, NODE_PORT, "tcp", count=2)

    assert over_v4.answered == 2, over_v4
    assert over_v6.answered == 2, over_v6


def test_ipv6_service_without_endpoints_is_refused(cluster: Cluster) -> None:
    cluster.topo.enable_ipv6()
    client = cluster.topo.add_pod("client", CLIENT_IP, CLIENT_IP6)
    cluster.service("empty", VIP, 53, [], 53, protocol="UDP", node_port=NODE_PORT, cluster_ip6=VIP6)
    cluster.sync()

    from_pod = probe(client.ns, VIP6, 53, "udp", count=2)
    from_outside = probe(cluster.outside, NODE_IP6, NODE_PORT, "udp", count=2)

    # ip6tables REJECT answers with ICMPv6 port unreachable: refused at once. (UDP, because over
    # veth the ICMPv6 error reaches a TCP client while connect() still holds its socket, and
    # Linux then reports it only after the SYN is retransmitted a second later.)
    assert from_pod.sequence == ["refused", "refused"], from_pod
    assert from_outside.sequence == ["refused", "refused"], from_outside


def test_ipv6_rules_in_dump_and_second_sync_changes_nothing(cluster: Cluster) -> None:
    _dual_stack_service(cluster)
    cluster.sync()

    dump6 = cluster.kproxy("dump", "--family", "6", *cluster.config_args())
    dump4 = cluster.kproxy("dump", "--family", "4", *cluster.config_args())

    if cluster.mode == "nftables":
        assert dump6.startswith("table ip6 kube-proxy {"), dump6
        assert dump4.startswith("table ip kube-proxy {"), dump4
        assert re.search(rf"\b{VIP6} \. tcp \. {PORT} : goto service-\S+", dump6), dump6
        for i in (1, 2):
            dnat = f"dnat to [fd00:168:{i}::10]:{TARGET}"
            endpoint_chain = rf"^\s+chain endpoint-[^\n]*\n[^}}]*{re.escape(dnat)}$"
            assert re.search(endpoint_chain, dump6, re.M), dump6
    else:
        assert re.search(rf"^-A KUBE-SERVICES -d {VIP6}/128 .* -j KUBE-SVC-\w+$", dump6, re.M), (
            dump6
        )
        for i in (1, 2):
            dnat = f"-j DNAT --to-destination [fd00:168:{i}::10]:{TARGET}"
            assert re.search(rf"^-A KUBE-SEP-\w+ .*{re.escape(dnat)}$", dump6, re.M), dump6
    assert VIP not in dump6 and "192.168." not in dump6
    assert VIP6 not in dump4 and "fd00:" not in dump4
    # The same rules, read back from the kernel (ip6tables-legacy-save, or nft).
    assert f"[fd00:168:1::10]:{TARGET}" in cluster.rules(family=6)
    assert "no changes" in cluster.sync()
