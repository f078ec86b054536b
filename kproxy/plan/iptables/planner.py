"""The iptables mode's planner: services, endpoints and the node -> a NodePlan whose kernel part
is one Ruleset per address family (canary chains included), plus the facts the rest of the agent
acts on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import ServicePort, ServicePortName
from kproxy.plan.conntrack import serving_sources
from kproxy.plan.iptables.ruleset import (
    PlanCache,
    needs_route_localnet,
    node_port_ips,
    node_ports_match_all,
    plan_ruleset,
    with_canaries,
)
from kproxy.plan.node_plan import NodePlan, PlanStats, plan_health_checks
from kproxy.rules.ir import Ruleset
from kproxy.rules.render import render_ruleset

MODE = "iptables"
ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"

IptablesPlan = NodePlan[Mapping[int, Ruleset]]


@dataclass
class IptablesPlanner:
    config: ProxyConfig
    _caches: dict[int, PlanCache] = field(default_factory=dict)

    def plan(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
        node: NodeInfo,
        families: tuple[int, ...],
    ) -> IptablesPlan:
        rulesets: dict[int, Ruleset] = {}
        no_local = [0, 0]
        for family in families:
            cache = self._caches.setdefault(family, PlanCache())
            planned = plan_ruleset(services, endpoints, node, self.config, family, cache)
            rulesets[family] = with_canaries(planned.ruleset)
            no_local[0] += planned.no_local_internal
            no_local[1] += planned.no_local_external
        return NodePlan(
            mode=MODE,
            kernel=rulesets,
            families=families,
            sysctls=self._sysctls(node),
            health_check_addresses=health_check_addresses(self.config, node),
            health_checks=plan_health_checks(services, endpoints, node),
            udp_serving={f: serving_sources(services, endpoints, f) for f in families},
            stats=PlanStats(no_local[0], no_local[1], count_rules(rulesets)),
        )

    def _sysctls(self, node: NodeInfo) -> tuple[tuple[str, str], ...]:
        """IPv4 NodePorts on 127.0.0.1 need route_localnet (kproxy sets it, never unsets it)."""
        return ((ROUTE_LOCALNET, "1"),) if needs_route_localnet(self.config, node) else ()


def health_check_addresses(config: ProxyConfig, node: NodeInfo) -> tuple[str, ...]:
    """Where healthCheckNodePort servers listen: every address, or the NodePort addresses."""
    if node_ports_match_all(config, 4, node):
        return ("0.0.0.0",)
    return tuple(node_port_ips(config, node, 4) + node_port_ips(config, node, 6))


def count_rules(rulesets: Mapping[int, Ruleset]) -> dict[str, int]:
    """Rules kproxy owns per table, over the families (kube-proxy's rules_total metric)."""
    counts: dict[str, int] = {}
    for ruleset in rulesets.values():
        for table in ruleset.tables:
            rules = len(table.jumps) + sum(len(c.rules) for c in table.chains)
            counts[table.name] = counts.get(table.name, 0) + rules
    return counts


def render_iptables_plan(plan: IptablesPlan, family: int) -> str:
    """One family's planned rules as iptables-save text (what `kproxy dump --manifests` prints)."""
    return render_ruleset(plan.kernel[family])
