"""The userspace mode with its default config (no bindAddress) serves pods of both kinds of pod
network: a routed pod (a veth without an address on the node's side, as Calico and Cilium give)
and a bridged pod (a port of a bridge with an address, as flannel's cni0). Each reaches both
endpoints of a ClusterIP service, one routed and one bridged, over TCP and UDP.

Upstream REDIRECTed container traffic when bound to the wildcard; REDIRECT rewrites the
destination to an address of the interface the packet came in on, so a routed pod's packets,
which arrive on an interface without one, are dropped."""

from __future__ import annotations

import pytest

from integration.bridged import add_bridge, add_bridged_pod
from integration.conftest import Cluster
from integration.netns import NODE_IP, NODE_IP6, Pod
from integration.traffic import probe, start_server
from integration.userspace.test_userspace import userspace_proxy

VIP = "10.96.100.20"
PORT = 80
TARGET = 8080
COUNT = 20


def _service(cluster: Cluster, proto: str) -> None:
    """A ClusterIP service with one routed and one bridged endpoint, on a node whose Node object
    names its InternalIP, as a cluster's does (so the node address portals send to is not the
    bridge's)."""
    cluster.node_object(internal_ips=[NODE_IP])
    add_bridge(cluster.topo)
    routed = cluster.backend("web-routed", "192.168.1.10", TARGET, proto)
    bridged = add_bridged_pod(cluster.topo, "web-bridged", "10.244.0.10")
    start_server(cluster.topo, bridged.ns, "web-bridged", TARGET, proto)
    cluster.service("web", VIP, PORT, [routed, bridged], TARGET, protocol=proto.upper())


def _client(cluster: Cluster, kind: str) -> Pod:
    if kind == "routed":
        return cluster.pod("client", "192.168.9.9")
    return add_bridged_pod(cluster.topo, "client", "10.244.0.99")


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("kind", ["routed", "bridged"])
def test_a_pod_reaches_both_endpoints_of_a_cluster_ip(
    cluster: Cluster, kind: str, proto: str
) -> None:
    _service(cluster, proto)
    client = _client(cluster, kind)
    with userspace_proxy(cluster):
        result = probe(client.ns, VIP, PORT, proto, count=COUNT)
    assert result.failed == 0, result
    if proto == "tcp":
        assert result.answers == {"web-routed": 10, "web-bridged": 10}, result  # round robin
    else:
        # A later attempt may get the source port of an earlier one whose relay mapping is
        # still live: that datagram keeps its endpoint, so the split need not be exact.
        assert set(result.answers) == {"web-routed", "web-bridged"}, result


VIP6 = "fd00:96::20"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_routed_pod_reaches_both_endpoints_over_ipv6(cluster: Cluster, proto: str) -> None:
    # The node's side of each pod veth holds only the link-local gateway fe80::1: the portal
    # sends to the node's global address instead.
    cluster.topo.enable_ipv6()
    cluster.node_object(internal_ips=[NODE_IP, NODE_IP6])
    backends = [
        cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET, proto, ip6=f"fd00:168:{i}::10")
        for i in (1, 2)
    ]
    cluster.service("web", VIP, PORT, backends, TARGET, protocol=proto.upper(), cluster_ip6=VIP6)
    client = cluster.topo.add_pod("client", "192.168.9.9", "fd00:168:9::9")
    with userspace_proxy(cluster):
        result = probe(client.ns, VIP6, PORT, proto, count=COUNT)
    assert result.failed == 0, result
    assert set(result.answers) == {"web-1", "web-2"}, result
