"""externalTrafficPolicy and internalTrafficPolicy Local, and health check node ports.

Endpoints on REMOTE_NODE are still reachable through the simulated node's routes: only their
EndpointSlice `nodeName` makes them remote, which is all kproxy looks at."""

from __future__ import annotations

import re

import pytest

from integration.conftest import Cluster, both_modes
from integration.netns import NODE_IP, OUTSIDE_IP
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
NODE_PORT = 30080
HEALTH_CHECK_NODE_PORT = 32100
LB_IP = "203.0.113.20"
EXTERNAL_IP = "203.0.113.10"
CLIENT_IP = "192.168.9.9"
CLUSTER_CIDR = "192.168.0.0/16"


@both_modes
@pytest.mark.parametrize(
    ("policy", "answering", "seen"),
    [
        # Local: only this node's endpoint, and no masquerade, so it sees the real client.
        pytest.param("Local", {"web-1"}, OUTSIDE_IP, id="Local"),
        # Cluster: both endpoints, masqueraded, so replies return through this node.
        pytest.param("Cluster", {"web-1", "web-2"}, NODE_IP, id="Cluster"),
    ],
)
def test_external_policy_decides_endpoints_and_source_address(
    cluster: Cluster, policy: str, answering: set[str], seen: str
) -> None:
    local = cluster.backend("web-1", "192.168.1.10", TARGET)
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    cluster.service(
        "web",
        VIP,
        PORT,
        [local, remote],
        TARGET,
        node_port=NODE_PORT,
        external_policy=policy,
        remote=[remote.name],
    )
    cluster.sync()

    result = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=30)

    assert result.failed == 0, result
    assert set(result.answers) == answering, result
    assert result.sources == {seen: 30}, result


@both_modes
def test_external_policy_local_applies_to_load_balancer_ips(cluster: Cluster) -> None:
    local = cluster.backend("web-1", "192.168.1.10", TARGET)
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    cluster.service(
        "web",
        VIP,
        PORT,
        [local, remote],
        TARGET,
        node_port=NODE_PORT,
        load_balancer_ips=[LB_IP],
        external_policy="Local",
        health_check_node_port=HEALTH_CHECK_NODE_PORT,
        remote=[remote.name],
    )
    cluster.sync()

    result = probe(cluster.outside, LB_IP, PORT, "tcp", count=20)

    assert result.answers == {"web-1": 20}, result
    assert result.sources == {OUTSIDE_IP: 20}, result
    assert "no changes" in cluster.sync()


@both_modes
@pytest.mark.parametrize(
    ("policy", "remote_only", "outcome"),
    [
        # No endpoint anywhere: REJECT, the client is refused at once, whatever the policy.
        pytest.param("Cluster", False, "refused", id="no-endpoints-Cluster"),
        pytest.param("Local", False, "refused", id="no-endpoints-Local"),
        # Endpoints elsewhere but none here: Local DROPs, so a load balancer's health check
        # (not the client) is what steers traffic away; the client's attempt just times out.
        pytest.param("Local", True, "timeout", id="remote-only-Local"),
    ],
)
def test_external_addresses_with_nowhere_to_go(
    cluster: Cluster, policy: str, remote_only: bool, outcome: str
) -> None:
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    endpoints = [remote] if remote_only else []
    cluster.service(
        "web",
        VIP,
        PORT,
        endpoints,
        TARGET,
        node_port=NODE_PORT,
        external_ips=[EXTERNAL_IP],
        load_balancer_ips=[LB_IP],
        external_policy=policy,
        remote=[remote.name],
    )
    cluster.sync()

    outcomes = {
        address: probe(cluster.outside, address, port, "tcp", timeout=1.0).sequence[0]
        for address, port in ((NODE_IP, NODE_PORT), (EXTERNAL_IP, PORT), (LB_IP, PORT))
    }

    assert outcomes == {NODE_IP: outcome, EXTERNAL_IP: outcome, LB_IP: outcome}


@both_modes
@pytest.mark.parametrize(
    ("client", "detect_local"),
    [
        pytest.param("pod", {"cluster_cidr": CLUSTER_CIDR}, id="pod-ClusterCIDR"),
        pytest.param("pod", {"detect_local_mode": "NodeCIDR"}, id="pod-NodeCIDR"),
        pytest.param(
            "pod",
            {"detect_local_mode": "InterfaceNamePrefix", "interface_name_prefix": "vp"},
            id="pod-InterfaceNamePrefix",
        ),
        pytest.param("node", {}, id="node"),
    ],
)
def test_local_policy_node_port_short_circuits_pod_and_node_traffic(
    cluster: Cluster, client: str, detect_local: dict[str, str]
) -> None:
    """Upstream sends pod and host traffic to a Local-policy NodePort to every endpoint, as if it
    had gone out to a load balancer and come back; only traffic from beyond the node is held to
    this node's endpoints (here: none, so it would be dropped)."""
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    pod = cluster.pod("client", CLIENT_IP)
    cluster.service(
        "web",
        VIP,
        PORT,
        [remote],
        TARGET,
        node_port=NODE_PORT,
        external_policy="Local",
        remote=[remote.name],
    )
    cluster.node_object(pod_cidrs=[CLUSTER_CIDR])
    cluster.configure(**detect_local)
    cluster.sync()
    source = pod.ns if client == "pod" else cluster.node

    result = probe(source, NODE_IP, NODE_PORT, "tcp", count=3)

    assert result.answers == {"web-2": 3}, result
    # A pod keeps its address; the node's own traffic is masqueraded (its source would be the
    # node address anyway).
    assert result.sources == {CLIENT_IP if client == "pod" else NODE_IP: 3}, result


@both_modes
def test_internal_policy_local_reaches_only_local_endpoints(cluster: Cluster) -> None:
    local = cluster.backend("web-1", "192.168.1.10", TARGET)
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    client = cluster.pod("client", CLIENT_IP)
    cluster.service(
        "web", VIP, PORT, [local, remote], TARGET, internal_policy="Local", remote=[remote.name]
    )
    cluster.sync()

    result = probe(client.ns, VIP, PORT, "tcp", count=30)

    assert result.answers == {"web-1": 30}, result
    assert result.sources == {CLIENT_IP: 30}, result


@both_modes
def test_internal_policy_local_leaves_node_port_traffic_to_every_endpoint(
    cluster: Cluster,
) -> None:
    local = cluster.backend("web-1", "192.168.1.10", TARGET)
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    client = cluster.pod("client", CLIENT_IP)
    cluster.service(
        "web",
        VIP,
        PORT,
        [local, remote],
        TARGET,
        node_port=NODE_PORT,
        internal_policy="Local",
        remote=[remote.name],
    )
    cluster.sync()

    internal = probe(client.ns, VIP, PORT, "tcp", count=20)
    external = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=20)

    assert internal.answers == {"web-1": 20}, internal
    # externalTrafficPolicy is Cluster: from outside, both (all 20 on one of two: p = 2e-6).
    assert set(external.answers) == {"web-1", "web-2"}, external


@both_modes
def test_internal_policy_local_without_local_endpoints_drops(cluster: Cluster) -> None:
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    client = cluster.pod("client", CLIENT_IP)
    cluster.service("web", VIP, PORT, [remote], TARGET, internal_policy="Local", remote=["web-2"])
    cluster.sync()

    result = probe(client.ns, VIP, PORT, "tcp", count=2, timeout=1.0)

    # DROP (timeout), not REJECT (refused): endpoints exist, just not on this node.
    assert result.sequence == ["timeout", "timeout"], result


# The iptables mode only: it reads the iptables-mode filter table, and the firewall it passes is an
# iptables INPUT policy, which no accept verdict in another table (the nftables mode's) overrides.
def test_health_check_node_port_is_accepted_by_the_filter_table(cluster: Cluster) -> None:
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    cluster.service(
        "web",
        VIP,
        PORT,
        [remote],
        TARGET,
        node_port=NODE_PORT,
        load_balancer_ips=[LB_IP],
        external_policy="Local",
        health_check_node_port=HEALTH_CHECK_NODE_PORT,
        remote=[remote.name],
    )
    cluster.sync()
    saved = cluster.save()
    filter_table = saved[saved.index("*filter") :]
    nat_table = saved[saved.index("*nat") :]
    nat_table = nat_table[: nat_table.index("COMMIT")]

    # The rule exists even with no local endpoint: the load balancer must be able to ask.
    accept = re.findall(
        rf"^-A KUBE-NODEPORTS .*--dport {HEALTH_CHECK_NODE_PORT} -j ACCEPT$", filter_table, re.M
    )
    assert len(accept) == 1, filter_table
    assert "health check node port" in accept[0]
    assert str(HEALTH_CHECK_NODE_PORT) not in nat_table  # never DNATed anywhere

    # A firewall that drops everything else: the health check port still gets through. `sync
    # --once` runs no health server, so the node's own stack refuses (accepted, nobody listens),
    # while another closed port stays silent (dropped by the policy).
    cluster.iptables("-P", "INPUT", "DROP")
    health = probe(cluster.outside, NODE_IP, HEALTH_CHECK_NODE_PORT, "tcp", count=2, timeout=1.0)
    other = probe(cluster.outside, NODE_IP, HEALTH_CHECK_NODE_PORT + 1, "tcp", count=1, timeout=1.0)

    assert health.sequence == ["refused", "refused"], health
    assert other.sequence == ["timeout"], other
