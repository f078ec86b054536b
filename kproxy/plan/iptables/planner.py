"""The iptables mode's planner: services, endpoints and the node -> a NodePlan whose kernel part
is one Ruleset per address family (canary chains included), plus the facts the rest of the agent
acts on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.plan.iptables.ruleset import (
    PlanCache,
    RulesetPlan,
    needs_route_localnet,
    plan_ruleset,
    with_canaries,
)
from kproxy.plan.node_plan import FamilyPlanner, NodePlan, PlanInput, assemble_node_plan
from kproxy.plan.xtables import count_rules
from kproxy.rules.ir import Ruleset
from kproxy.rules.render import render_ruleset

MODE = "iptables"
ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"

IptablesPlan = NodePlan[Mapping[int, Ruleset]]


@dataclass
class IptablesPlanner(FamilyPlanner[Mapping[int, Ruleset], RulesetPlan]):
    config: ProxyConfig
    _caches: dict[int, PlanCache] = field(default_factory=dict)

    def plan_family(self, given: PlanInput, family: int) -> RulesetPlan:
        cache = self._caches.setdefault(family, PlanCache())
        g = given
        return plan_ruleset(g.services, g.endpoints, g.node, g.config, family, cache)

    def assemble(self, given: PlanInput, planned: Mapping[int, RulesetPlan]) -> IptablesPlan:
        rulesets = {family: with_canaries(p.ruleset) for family, p in planned.items()}
        sysctls = self._sysctls(given.node)
        rules = count_rules(rulesets)
        return assemble_node_plan(MODE, rulesets, given, planned.values(), rules, sysctls)

    def _sysctls(self, node: NodeInfo) -> tuple[tuple[str, str], ...]:
        """IPv4 NodePorts on 127.0.0.1 need route_localnet (kproxy sets it, never unsets it)."""
        return ((ROUTE_LOCALNET, "1"),) if needs_route_localnet(self.config, node) else ()


def render_iptables_plan(plan: IptablesPlan, family: int) -> str:
    """One family's planned rules as iptables-save text (what `kproxy dump --manifests` prints)."""
    return render_ruleset(plan.kernel[family])
