"""What a sync reports as programmed is counted cheaply, and counted as before."""

from __future__ import annotations

from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.sync.loop import Snapshot


def spn(name: str, port: str = "") -> ServicePortName:
    return ServicePortName(NamespacedName("default", name), port, Protocol.TCP)


def test_ready_endpoints_are_the_first_of_the_endpoint_counts() -> None:
    ports = [spn("a"), spn("b", "http"), spn("b", "dns"), spn("c")]
    services = {p: ServicePort(p, ("10.96.0.1",), 80) for p in ports}
    endpoints = {
        spn("a"): (Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80, ready=False)),
        spn("b", "http"): (Endpoint("10.0.0.1", 8080),),
        spn("b", "dns"): (Endpoint("10.0.0.3", 53, ready=False),),
        spn("gone"): (Endpoint("10.0.0.9", 80),),  # no such service port: not counted
    }
    snapshot = Snapshot(services, endpoints, NodeInfo("n"), set(), [], False)
    assert snapshot.ready_endpoints() == snapshot.endpoint_counts()[0] == 2
