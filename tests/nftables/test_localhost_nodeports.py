"""Localhost NodePorts (KEP-6032): which listeners the nftables mode plans under the gate, and
what the relay-backed listeners count (the KEP's metrics)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from kproxy.dataplane.localhost_nodeports import LocalhostNodePorts, open_localhost_node_ports
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.localhost_nodeports import GATE, LocalhostNodePort, plan_localhost_node_ports
from kproxy.plan.nftables.planner import NftablesPlanner

NODE = NodeInfo("node-a")
ON = ProxyConfig(mode="nftables", feature_gates=((GATE, True),))


def port(name: str, protocol: Protocol = Protocol.TCP, **kw: object) -> ServicePort:
    spn = ServicePortName(NamespacedName("default", name), "p", protocol)
    return ServicePort(spn, ("10.96.0.1", "fd00::1"), 80, **kw)  # type: ignore[arg-type]


WEB = port("web", node_port=30080)
LOCAL = port("local", node_port=30081, external_policy_local=True)
DNS = port("dns", Protocol.UDP, node_port=30053)
CLUSTER_ONLY = port("internal")
ENDPOINTS = {
    svc.name: (
        Endpoint("10.0.0.1", 8080, node_name="node-a"),
        Endpoint("10.0.0.2", 8080, node_name="node-b"),
        Endpoint("fd00::a", 8080, node_name="node-b"),
    )
    for svc in (WEB, LOCAL, DNS, CLUSTER_ONLY)
}
SERVICES = {svc.name: svc for svc in (WEB, LOCAL, DNS, CLUSTER_ONLY)}


def plan(config: ProxyConfig, families: tuple[int, ...] = (4, 6)) -> list[LocalhostNodePort]:
    return list(plan_localhost_node_ports(SERVICES, ENDPOINTS, NODE, config, families))


def test_without_the_gate_no_listener_is_planned() -> None:
    assert plan(ProxyConfig(mode="nftables")) == []
    off = NftablesPlanner(ProxyConfig(mode="nftables")).plan(SERVICES, ENDPOINTS, NODE, (4,))
    assert off.localhost_node_ports == ()


def test_tcp_node_ports_get_a_listener_per_family_under_their_traffic_policy() -> None:
    planned = {(str(p.name), p.family): (p.address, p.node_port, p.endpoints) for p in plan(ON)}
    assert planned == {
        ("default/web:p", 4): ("127.0.0.1", 30080, (("10.0.0.1", 8080), ("10.0.0.2", 8080))),
        ("default/web:p", 6): ("::1", 30080, (("fd00::a", 8080),)),
        # Local: this node's endpoints only; none of IPv6 here, so connections are reset.
        ("default/local:p", 4): ("127.0.0.1", 30081, (("10.0.0.1", 8080),)),
        ("default/local:p", 6): ("::1", 30081, ()),
    }


def test_the_nftables_planner_carries_the_listeners() -> None:
    planned = NftablesPlanner(ON).plan(SERVICES, ENDPOINTS, NODE, (4,))
    assert [p.node_port for p in planned.localhost_node_ports] == [30081, 30080]


@pytest.mark.parametrize(
    ("addresses", "families"),
    [
        ((), {4, 6}),
        (("primary",), set()),
        (("192.168.0.0/16",), set()),
        (("127.0.0.0/8",), {4}),
        (("primary", "::1/128"), {6}),
    ],
)
def test_node_port_addresses_choose_the_loopback_families(
    addresses: tuple[str, ...], families: set[int]
) -> None:
    config = ProxyConfig(
        mode="nftables", feature_gates=((GATE, True),), node_port_addresses=addresses
    )
    assert {p.family for p in plan(config)} == families


@pytest.fixture
def localhost() -> Iterator[LocalhostNodePorts]:
    with open_localhost_node_ports((4,)) as served:
        yield served


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_port_taken_by_another_program_counts_a_creation_failure_per_sync(
    localhost: LocalhostNodePorts,
) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        wanted = [LocalhostNodePort(WEB.name, 4, taken, (("127.0.0.1", 1),))]
        localhost.sync(wanted)
        localhost.sync(wanted)
        assert localhost.counts()[4] == {"listeners": 0, "creation_failures": 2, "rejected": 0}


def test_a_connection_without_an_endpoint_is_reset_and_counted(
    localhost: LocalhostNodePorts,
) -> None:
    node_port = free_port()
    localhost.sync([LocalhostNodePort(LOCAL.name, 4, node_port, ())])
    # The reset may already reach connect() (loopback is that fast), else the first read.
    with (
        pytest.raises(ConnectionResetError),
        socket.create_connection(("127.0.0.1", node_port), timeout=5) as sock,
    ):
        sock.recv(1)
    metrics = ProxyMetrics()
    metrics.watch_localhost_node_ports(localhost.counts)
    text = generate_latest(metrics.registry).decode()
    assert 'kubeproxy_nftables_localhost_nodeport_listeners{ip_family="IPv4"} 1.0' in text
    assert (
        'kubeproxy_nftables_localhost_nodeport_rejected_packets_total{ip_family="IPv4",'
        'protocol="TCP"} 1.0' in text
    )
    # The NodePort gone: no listener, and the counter keeps what it counted.
    localhost.sync(())
    assert localhost.counts()[4] == {"listeners": 0, "creation_failures": 0, "rejected": 1}


def test_ipv6_node_ports_are_relayed_on_the_ipv6_loopback() -> None:
    with socket.socket(socket.AF_INET6) as backend:
        backend.bind(("::1", 0))
        backend.listen()
        with open_localhost_node_ports((6,)) as localhost:
            node_port = free_port()
            endpoint = ("::1", int(backend.getsockname()[1]))
            localhost.sync([LocalhostNodePort(WEB.name, 6, node_port, (endpoint,))])
            with socket.create_connection(("::1", node_port), timeout=5) as client:
                conn, _ = backend.accept()
                with conn:
                    conn.sendall(b"web-a\n")
                    assert client.recv(16) == b"web-a\n"
            assert localhost.counts()[6]["listeners"] == 1
