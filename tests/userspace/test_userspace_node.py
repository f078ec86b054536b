"""The userspace mode's node dataplane over the fake tables and a real relay on loopback: what
health and metrics see of the relay, and the hand-over to the iptables mode as the agent stops."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from userspace_support import LOOPBACK, TcpServer, wait_until

from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.userspace.node import UserspaceNode
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.iptables.planner import IptablesPlanner
from kproxy.plan.userspace.planner import UserspacePlan, UserspacePlanner

WEB = ServicePortName(NamespacedName("default", "web"), "http", Protocol.TCP)
NODE = NodeInfo("node-a", local_addresses=("10.0.0.5",), primary_ips=("10.0.0.5",))


@pytest.fixture
def node() -> Iterator[UserspaceNode]:
    sysctls: list[Any] = []
    relay = Relay()
    relay.start()
    node = UserspaceNode({4: FakeDataplane()}, {4: relay}, write_sysctls=sysctls.extend)
    try:
        yield node
    finally:
        relay.stop()


def state(server: TcpServer) -> tuple[dict[Any, ServicePort], dict[Any, tuple[Endpoint, ...]]]:
    services = {WEB: ServicePort(WEB, ("172.30.0.10",), 80, node_port=30080)}
    return services, {WEB: (Endpoint(LOOPBACK, server.addr[1]),)}


def plan(server: TcpServer) -> UserspacePlan:
    services, endpoints = state(server)
    return UserspacePlanner(ProxyConfig()).plan(services, endpoints, NODE, (4,))


def proxy_port(node: UserspaceNode) -> int:
    return next(iter(node.relays[4].bound_ports().values()))


def test_metrics_export_the_relays_counters_per_service_port(node: UserspaceNode) -> None:
    server = TcpServer("web-1")
    node.apply(plan(server), full=True)
    metrics = ProxyMetrics()
    metrics.watch_relay(node.service_port_counters)
    with socket.create_connection((LOOPBACK, proxy_port(node))) as conn:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(100) == b"web-1:hello"

    def sample(name: str, **labels: str) -> float | None:
        labels = {"service_port": str(WEB), **labels}
        return metrics.registry.get_sample_value(name, labels)

    wait_until(lambda: sample("kproxy_userspace_active_connections") == 0)
    assert sample("kproxy_userspace_connections_total") == 1
    assert sample("kproxy_userspace_bytes_total", direction="to_endpoint") == 5
    assert sample("kproxy_userspace_bytes_total", direction="to_client") == len(b"web-1:hello")
    assert sample("kproxy_userspace_endpoint_dial_failures_total") == 0


def test_a_stopped_relay_makes_health_fail(node: UserspaceNode) -> None:
    health = ProxyHealth(timeout=60)
    health.dataplane_problems = node.problems
    assert health.status()[0] and node.problems() == []
    node.relays[4].stop()
    healthy, body = health.status()
    assert not healthy
    assert body["dataplane"] == {
        "healthy": False,
        "problems": ["the IPv4 userspace relay's thread has stopped"],
    }


def test_hand_over_puts_the_iptables_rules_in_place_of_the_portals(node: UserspaceNode) -> None:
    server = TcpServer("web-1")
    node.apply(plan(server), full=True)
    fake = node.rules.dataplanes[4]
    assert isinstance(fake, FakeDataplane)
    assert "KUBE-PORTALS-CONTAINER" in fake.dump() and node.holds[4].held
    services, endpoints = state(server)
    result = node.hand_over(IptablesPlanner(ProxyConfig()).plan(services, endpoints, NODE, (4,)))
    tables = fake.dump()
    assert "KUBE-PORTALS-" not in tables and "KUBE-NODEPORT-NON-LOCAL" not in tables
    assert "KUBE-SERVICES" in tables and "-j KUBE-SVC-" in tables
    assert result.chains_removed >= 5
    assert not node.holds[4].held  # the NodePort is the iptables mode's to hold now


def test_drain_waits_for_open_connections_and_reports_what_is_left(node: UserspaceNode) -> None:
    server = TcpServer("echo", mode="echo")
    node.apply(plan(server), full=True)
    conn = socket.create_connection((LOOPBACK, proxy_port(node)))
    conn.sendall(b"x")
    assert conn.recv(1) == b"x"
    assert node.drain(0.1) == 1
    conn.close()
    assert node.drain(3.0) == 0
