"""The iptables mode's planner: services, endpoints and the node -> a NodePlan whose kernel part
is one Ruleset per address family (canary chains included), plus the facts the rest of the agent
acts on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.plan.iptables.kept import PlanCache, SeenMaps
from kproxy.plan.iptables.ruleset import (
    RulesetPlan,
    needs_route_localnet,
    plan_ruleset,
    with_canaries,
)
from kproxy.plan.node_plan import FamilyPlanner, NodePlan, PlanInput, assemble_node_plan
from kproxy.rules.ir import Ruleset
from kproxy.rules.render import render_ruleset

MODE = "iptables"
ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"

IptablesPlan = NodePlan[Mapping[int, Ruleset]]


@dataclass
class IptablesPlanner(FamilyPlanner[Mapping[int, Ruleset], RulesetPlan]):
    config: ProxyConfig
    _caches: dict[int, PlanCache] = field(default_factory=dict)
    _seen: tuple[PlanInput, SeenMaps] | None = None  # the input being planned, as ids

    def plan_family(self, given: PlanInput, family: int) -> RulesetPlan:
        cache = self._caches.setdefault(family, PlanCache())
        g = given
        if self._seen is None or self._seen[0] is not given:  # once for all families
            self._seen = (given, SeenMaps(g.services, g.endpoints))
        seen = self._seen[1]
        return plan_ruleset(g.services, g.endpoints, g.node, g.config, family, cache, seen)

    def assemble(self, given: PlanInput, planned: Mapping[int, RulesetPlan]) -> IptablesPlan:
        self._seen = None  # every family is planned: the caches keep what they need of it
        rulesets = {family: with_canaries(p.ruleset) for family, p in planned.items()}
        sysctls = self._sysctls(given.node)
        rules = _count_rules(planned.values(), rulesets)
        return assemble_node_plan(MODE, rulesets, given, planned.values(), rules, sysctls)

    def _sysctls(self, node: NodeInfo) -> tuple[tuple[str, str], ...]:
        """IPv4 NodePorts on 127.0.0.1 need route_localnet (kproxy sets it, never unsets it)."""
        return ((ROUTE_LOCALNET, "1"),) if needs_route_localnet(self.config, node) else ()


def _count_rules(planned: Iterable[RulesetPlan], rulesets: Mapping[int, Ruleset]) -> dict[str, int]:
    """count_rules(rulesets), from the counts each family's plan made: the canary chains hold
    no rule, and a table the planner did not make (mangle, for its canary) none but those."""
    counts: dict[str, int] = {}
    for p in planned:
        for name, rules in p.rules.items():
            counts[name] = counts.get(name, 0) + rules
    for ruleset in rulesets.values():
        for table in ruleset.tables:
            counts.setdefault(table.name, 0)
    return counts


def render_iptables_plan(plan: IptablesPlan, family: int) -> str:
    """One family's planned rules as iptables-save text (what `kproxy dump --manifests` prints)."""
    return render_ruleset(plan.kernel[family])
