"""The userspace planner: listeners, the shared endpoint selection, skipped ports, families."""

from __future__ import annotations

from dataclasses import replace

import pytest
import scenarios
from scenarios import NODE, NODE_IP, endpoint, endpoint_slice, service, service_port, slice_port
from test_userspace_golden import portals

from kproxy.errors import ConfigError
from kproxy.model.config import ProxyConfig
from kproxy.model.service import Protocol
from kproxy.plan.endpoints import categorize_endpoints
from kproxy.plan.userspace.planner import SCTP_REASON, UserspacePlan, UserspacePlanner
from kproxy.plan.userspace.portals import Scope, host_ip
from kproxy.rules.render import render_ruleset


def plan(scenario: scenarios.Scenario, families: tuple[int, ...] = (4,)) -> UserspacePlan:
    state = scenario.state()
    return UserspacePlanner(scenario.config).plan(
        state.services_map(), state.endpoints_map(), scenario.node, families
    )


def test_one_listener_per_tcp_and_udp_port() -> None:
    listeners = plan(portals()).kernel.families[4].listeners
    assert [(str(lis.name), lis.protocol) for lis in listeners] == [
        ("ns1/dns:dns", Protocol.UDP),
        ("ns1/web:http", Protocol.TCP),
    ]
    web = listeners[1]
    assert (web.bind_address, web.cluster_ip, web.port, web.node_port) == (
        "0.0.0.0",
        "172.30.0.10",
        80,
        30080,
    )
    assert web.external_ips == ("192.0.2.10",) and web.load_balancer_ips == ("198.51.100.10",)
    assert web.held_ports == (("", 30080),)


@pytest.mark.parametrize(
    "scenario",
    [
        scenarios.terminating_fallback(),
        scenarios.topology(),
        scenarios.external(etp="Local"),
        scenarios.external(itp="Local", local_endpoint=False),
        scenarios.single_service(),
    ],
)
def test_endpoints_are_the_iptables_modes_choice(scenario: scenarios.Scenario) -> None:
    state = scenario.state()
    services, endpoints = state.services_map(), state.endpoints_map()
    for lis in plan(scenario).kernel.families[4].listeners:
        sp, eps = services[lis.name], endpoints.get(lis.name, ())
        every = categorize_endpoints(eps, NODE, scenario.node.zone, True, True)
        internal = every.local if sp.internal_policy_local else every.cluster
        external = every.local if sp.external_policy_local else every.cluster
        assert lis.endpoints == (external if lis.scope is Scope.EXTERNAL else internal)
        if lis.scope is Scope.ALL:  # one listener serves both: the policies agree
            assert not (sp.node_port or sp.external_ips) or internal == external


def test_terminating_fallback_and_topology_narrow_the_endpoints() -> None:
    fallback = plan(scenarios.terminating_fallback()).kernel.families[4].listeners[0]
    assert fallback.endpoints and all(ep.terminating for ep in fallback.endpoints)
    zonal = plan(scenarios.topology()).kernel.families[4].listeners[0]
    assert sorted(ep.ip for ep in zonal.endpoints) == ["10.30.0.1", "10.30.0.3"]


def test_differing_policies_give_external_traffic_a_listener_of_its_own() -> None:
    scenario = scenarios.external(etp="Local")
    internal, external = plan(scenario).kernel.families[4].listeners
    assert (internal.scope, external.scope) == (Scope.INTERNAL, Scope.EXTERNAL)
    assert len(internal.endpoints) == 2
    assert [ep.ip for ep in external.endpoints] == ["10.20.0.1"]
    # Each listener's portals: the ClusterIP to the internal one, the rest to the external one.
    ports = {internal.key: 41000, external.key: 42000}
    text = render_ruleset(plan(scenario).kernel.families[4].ruleset(ports))
    cluster_lines = [line for line in text.splitlines() if f"-d {internal.cluster_ip}/32" in line]
    assert cluster_lines and all("41000" in line for line in cluster_lines), cluster_lines
    other = [line for line in text.splitlines() if "42000" in line]
    assert other and not any(internal.cluster_ip in line for line in other), other
    assert internal.held_ports == () and external.held_ports == (("", internal.node_port),)
    nothing = plan(scenarios.external(etp="Local", local_endpoint=False))
    assert nothing.kernel.families[4].listeners[1].endpoints == ()
    assert nothing.stats.no_local_external == 1


def test_agreeing_policies_share_one_listener() -> None:
    for scenario in (scenarios.external(), scenarios.external(itp="Local", etp="Local")):
        listeners = plan(scenario).kernel.families[4].listeners
        assert [lis.scope for lis in listeners] == [Scope.ALL]


def sctp_and_udp() -> scenarios.Scenario:
    ports = [service_port(9000, "s", protocol="SCTP"), service_port(53, "u", protocol="UDP")]
    return scenarios.Scenario(
        services=[service("mixed", "172.30.0.7", ports)],
        slices=[
            endpoint_slice(
                "mixed",
                "mixed-a",
                [slice_port(9000, "s", "SCTP"), slice_port(53, "u", "UDP")],
                [endpoint("10.1.0.1")],
            )
        ],
        node=scenarios.external().node,
    )


def test_sctp_is_skipped_and_reported_once() -> None:
    result = plan(sctp_and_udp(), (4, 6))
    assert [(str(s.name), s.reason) for s in result.kernel.skipped] == [
        ("default/mixed:s", SCTP_REASON)
    ]
    assert [str(lis.name) for lis in result.kernel.families[4].listeners] == ["default/mixed:u"]


def test_headless_and_external_name_services_get_no_listener() -> None:
    headless = service("h", "None", [service_port(80)])
    external = service("e", "172.30.0.9", [service_port(80)], type="ExternalName")
    result = plan(scenarios.Scenario(services=[headless, external]))
    assert result.kernel.families[4].listeners == ()


def test_no_affinity_is_none() -> None:
    listeners = plan(scenarios.single_service()).kernel.families[4].listeners
    assert {lis.affinity_seconds for lis in listeners} == {None}


def test_affinity_timeout_is_carried() -> None:
    svc = service("a", "172.30.0.8", [service_port(80)], affinity_seconds=600)
    listener = plan(scenarios.Scenario(services=[svc])).kernel.families[4].listeners[0]
    assert listener.affinity_seconds == 600


def test_families_split_addresses_and_endpoints() -> None:
    result = plan(scenarios.dual_stack(), (4, 6))
    v4 = result.kernel.families[4].listeners
    v6 = result.kernel.families[6].listeners
    assert v4 and v6
    assert all(":" not in lis.cluster_ip and lis.bind_address == "0.0.0.0" for lis in v4)
    assert all(":" in lis.cluster_ip and lis.bind_address == "::" for lis in v6)
    assert all(ep.family == 6 for lis in v6 for ep in lis.endpoints)
    assert all(ep.family == 4 for lis in v4 for ep in lis.endpoints)


def test_a_specific_bind_address_serves_its_family_only() -> None:
    scenario = scenarios.dual_stack()
    scenario = replace(scenario, config=ProxyConfig(bind_address="192.168.1.20"))
    result = plan(scenario, (4, 6))
    assert result.kernel.families[6].listeners == ()
    assert {lis.bind_address for lis in result.kernel.families[4].listeners} == {"192.168.1.20"}


def test_loopback_bind_address_is_refused() -> None:
    with pytest.raises(ConfigError):
        UserspacePlanner(ProxyConfig(bind_address="127.0.0.1"))


def test_host_ip_is_the_primary_address_or_the_bind_address() -> None:
    node = portals().node
    assert host_ip(node, ProxyConfig(), 4) == NODE_IP
    assert host_ip(node, ProxyConfig(bind_address="192.168.1.20"), 4) == "192.168.1.20"
    assert host_ip(replace(node, primary_ips=()), ProxyConfig(), 4) == NODE_IP
    assert (
        host_ip(replace(node, primary_ips=(), local_addresses=("127.0.0.1",)), ProxyConfig(), 4)
        is None
    )


def test_host_ip_is_a_local_address_neither_loopback_nor_link_local() -> None:
    node = replace(
        portals().node,
        primary_ips=("192.0.2.99",),  # the Node object's InternalIP, not held by this node
        local_addresses=("127.0.0.1", "169.254.1.1", NODE_IP),
    )
    assert host_ip(node, ProxyConfig(), 4) == NODE_IP
    # Without the node's addresses (a dump with no node facts) the Node object is believed.
    assert host_ip(replace(node, local_addresses=()), ProxyConfig(), 4) == "192.0.2.99"


def _container_targets(scenario: scenarios.Scenario) -> set[str]:
    part = plan(scenario).kernel.families[4]
    text = render_ruleset(part.ruleset({lis.key: 36000 for lis in part.listeners}))
    return {
        line.partition(" -j ")[2]
        for line in text.splitlines()
        if line.startswith(("-A KUBE-PORTALS-CONTAINER", "-A KUBE-NODEPORT-CONTAINER"))
    }


def test_container_traffic_is_dnated_to_the_node_address_not_redirected() -> None:
    # REDIRECT needs an address on the incoming interface: a routed pod's veth has none.
    assert _container_targets(portals()) == {f"DNAT --to-destination {NODE_IP}:36000"}


def test_container_traffic_is_redirected_only_without_a_node_address() -> None:
    scenario = portals()
    bare = replace(scenario.node, primary_ips=(), local_addresses=("127.0.0.1",))
    assert _container_targets(replace(scenario, node=bare)) == {"REDIRECT --to-ports 36000"}


def test_unbound_listeners_get_no_rules() -> None:
    part = plan(portals()).kernel.families[4]
    ruleset = part.ruleset({})
    nat = ruleset.table("nat")
    assert nat is not None and all(not chain.rules for chain in nat.chains)
    assert len(nat.jumps) == 4


def test_shared_facts() -> None:
    result = plan(portals())
    assert result.mode == "userspace" and result.sysctls == ()
    serving = result.udp_serving[4]
    assert set(serving) == {("172.30.0.53", 53)}
    assert NODE_IP in serving[("172.30.0.53", 53)]
    assert "10.20.0.2" not in serving[("172.30.0.53", 53)]  # an endpoint answering is stale
    assert result.stats.rules == {"filter": 4, "nat": 15}  # with the jump rules


def test_health_checks_are_planned() -> None:
    result = plan(scenarios.external(etp="Local"))
    assert [(str(h.service), h.port, h.local_endpoints) for h in result.health_checks] == [
        ("ns9/lb", 32000, 1)
    ]


def test_the_same_input_gives_the_same_plan() -> None:
    first, second = plan(portals()), plan(portals())
    ports = {lis.key: 40000 for lis in first.kernel.families[4].listeners}
    assert first.kernel.families[4].ruleset(ports) == second.kernel.families[4].ruleset(ports)


def test_default_affinity_timeout_is_three_hours() -> None:
    svc = service("a", "172.30.0.8", [service_port(80)], sessionAffinity="ClientIP")
    listener = plan(scenarios.Scenario(services=[svc])).kernel.families[4].listeners[0]
    assert listener.affinity_seconds == 10800
