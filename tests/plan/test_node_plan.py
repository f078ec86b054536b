"""The iptables mode's NodePlan: besides the rulesets, the facts the rest of the agent acts on
(sysctls, health-check listeners, UDP sources conntrack keeps, metrics), worked out once, with
the node."""

from __future__ import annotations

from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.iptables.planner import ROUTE_LOCALNET, IptablesPlanner
from kproxy.plan.iptables.ruleset import plan_ruleset, with_canaries
from kproxy.plan.node_plan import HealthCheckServer

NODE = NodeInfo(
    name="node-a",
    primary_ips=("172.31.0.2",),
    local_addresses=("127.0.0.1", "172.31.0.2", "172.31.1.2"),
)
WEB = NamespacedName("default", "web")
DNS = NamespacedName("kube-system", "kube-dns")


def cluster() -> tuple[
    dict[ServicePortName, ServicePort], dict[ServicePortName, tuple[Endpoint, ...]]
]:
    http = ServicePortName(WEB, "http", Protocol.TCP)
    https = ServicePortName(WEB, "https", Protocol.TCP)
    dns = ServicePortName(DNS, "dns", Protocol.UDP)
    services = {
        http: ServicePort(
            http,
            ("10.96.0.5",),
            80,
            node_port=30080,
            external_policy_local=True,
            health_check_node_port=32000,
        ),
        https: ServicePort(https, ("10.96.0.5",), 443, node_port=30443),
        dns: ServicePort(dns, ("10.96.0.10",), 53, node_port=30053),
    }
    here = Endpoint("10.0.0.1", 8080, node_name="node-a")
    endpoints = {
        http: (
            here,
            Endpoint("10.0.0.2", 8080, node_name="node-a", ready=False),
            Endpoint("10.0.1.1", 8080, node_name="node-b"),
        ),
        https: (Endpoint("10.0.0.1", 8443, node_name="node-a"),),
        dns: (Endpoint("10.0.2.1", 53, node_name="node-b", ready=False, serving=True),),
    }
    return services, endpoints


def test_rulesets_are_the_node_rulesets() -> None:
    services, endpoints = cluster()
    plan = IptablesPlanner(ProxyConfig()).plan(services, endpoints, NODE, (4,))
    planned = plan_ruleset(services, endpoints, NODE, ProxyConfig(), 4)
    assert plan.kernel[4] == with_canaries(planned.ruleset)
    assert plan.mode == "iptables" and plan.families == (4,)


def test_health_checks_count_ready_local_endpoints_once_per_address() -> None:
    services, endpoints = cluster()
    plan = IptablesPlanner(ProxyConfig()).plan(services, endpoints, NODE, (4,))
    assert plan.health_checks == (HealthCheckServer(WEB, 32000, 1),)
    assert plan.health_check_addresses == ("0.0.0.0",)


def test_primary_node_port_addresses_listen_on_the_primary_address_only() -> None:
    services, endpoints = cluster()
    config = ProxyConfig(node_port_addresses=("primary",))
    plan = IptablesPlanner(config).plan(services, endpoints, NODE, (4,))
    assert plan.health_check_addresses == ("172.31.0.2",)
    assert plan.sysctls == ()  # no NodePort on 127.0.0.1, so no route_localnet


def test_localhost_node_ports_ask_for_route_localnet() -> None:
    services, endpoints = cluster()
    assert IptablesPlanner(ProxyConfig()).plan(services, endpoints, NODE, (4,)).sysctls == (
        (ROUTE_LOCALNET, "1"),
    )
    off = ProxyConfig(localhost_nodeports=False)
    assert IptablesPlanner(off).plan(services, endpoints, NODE, (4,)).sysctls == ()


def test_udp_serving_sources_per_family() -> None:
    services, endpoints = cluster()
    plan = IptablesPlanner(ProxyConfig()).plan(services, endpoints, NODE, (4, 6))
    assert plan.udp_serving[4] == {
        ("10.96.0.10", 53): frozenset({"10.0.2.1"}),  # serving though not ready
        ("*", 30053): frozenset({"10.0.2.1"}),
    }
    assert plan.udp_serving[6] == {("*", 30053): frozenset()}


def test_stats_count_rules_and_services_without_local_endpoints() -> None:
    services, endpoints = cluster()
    gone = {spn: eps for spn, eps in endpoints.items() if spn.port != "http"}
    gone[next(spn for spn in services if spn.port == "http")] = (
        Endpoint("10.0.1.1", 8080, node_name="node-b"),
    )
    plan = IptablesPlanner(ProxyConfig()).plan(services, gone, NODE, (4,))
    assert plan.stats.no_local_external == 1 and plan.stats.no_local_internal == 0
    ruleset = plan.kernel[4]
    nat = ruleset.table("nat")
    assert nat is not None
    assert plan.stats.rules["nat"] == len(nat.jumps) + sum(len(c.rules) for c in nat.chains)
