"""Golden tests of the userspace mode: scenario -> the portal rules as iptables-save text, compared
with tests/golden/userspace_*.rules.

After a deliberate change, regenerate with
`KPROXY_UPDATE_GOLDEN=1 .venv/bin/pytest tests/userspace/test_userspace_golden.py` and review
the diff line by line against upstream's userspace proxier (chains, jump positions, match order,
targets, comments) before keeping it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import scenarios
from scenarios import (
    NODE,
    NODE_IP,
    Scenario,
    endpoint,
    endpoint_slice,
    service,
    service_port,
    slice_port,
)

from kproxy.model.node import NodeInfo
from kproxy.plan.userspace.planner import UserspacePlanner
from kproxy.rules.render import render_ruleset

GOLDEN = scenarios.GOLDEN
FIRST_PROXY_PORT = 36000


def portals() -> Scenario:
    """A LoadBalancer TCP service (externalIP, LB IP, NodePort) and a UDP ClusterIP service."""
    web = service(
        "web",
        "172.30.0.10",
        [service_port(80, "http", node_port=30080)],
        namespace="ns1",
        type="LoadBalancer",
        externalIPs=["192.0.2.10"],
        lb_ingress=["198.51.100.10"],
    )
    dns = service("dns", "172.30.0.53", [service_port(53, "dns", protocol="UDP")], namespace="ns1")
    return Scenario(
        services=[web, dns],
        slices=[
            endpoint_slice(
                "web", "web-a", [slice_port(8080, "http")], [endpoint("10.20.0.1")], namespace="ns1"
            ),
            endpoint_slice(
                "dns",
                "dns-a",
                [slice_port(53, "dns", "UDP")],
                [endpoint("10.20.0.2")],
                namespace="ns1",
            ),
        ],
        config=scenarios.CLUSTER_CIDR,
        node=NodeInfo(NODE, local_addresses=(NODE_IP, "127.0.0.1"), primary_ips=(NODE_IP,)),
    )


def render(scenario: Scenario) -> str:
    state = scenario.state()
    plan = UserspacePlanner(scenario.config).plan(
        state.services_map(), state.endpoints_map(), scenario.node, (4,)
    )
    part = plan.kernel.families[4]
    ports = {lis.key: FIRST_PROXY_PORT + i for i, lis in enumerate(part.listeners)}
    return render_ruleset(part.ruleset(ports))


BIND_IP = "192.168.1.20"


def bound_to_node_ip() -> Scenario:
    """bindAddress is a second address of the node: container and host traffic DNAT to it."""
    scenario = portals()
    node = replace(scenario.node, local_addresses=(*scenario.node.local_addresses, BIND_IP))
    return replace(scenario, config=replace(scenario.config, bind_address=BIND_IP), node=node)


def source_ranges() -> Scenario:
    """loadBalancerSourceRanges on the LoadBalancer: its LB IP's portals take those sources only
    (and the LB IP itself, since a range holds the node's address); the rest is dropped."""
    scenario = portals()
    web = scenario.services[0]
    ranges = ["203.0.113.0/25", "192.168.1.0/24"]
    web = {**web, "spec": {**web["spec"], "loadBalancerSourceRanges": ranges}}
    return replace(scenario, services=[web, *scenario.services[1:]])


GOLDEN_CASES = {
    "userspace_wildcard": lambda: render(portals()),
    "userspace_bind_address": lambda: render(bound_to_node_ip()),
    "userspace_source_ranges": lambda: render(source_ranges()),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_userspace_golden(name: str) -> None:
    scenarios.assert_golden(name, GOLDEN_CASES[name]())


def test_every_userspace_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("userspace_*.rules")} <= set(GOLDEN_CASES)
