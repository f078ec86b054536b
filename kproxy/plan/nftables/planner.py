"""The nftables mode's planner: services, endpoints and the node -> a NodePlan whose kernel part
is one `kube-proxy` table per address family, plus the facts the rest of the agent acts on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kproxy.model.config import ProxyConfig
from kproxy.plan.localhost_nodeports import plan_localhost_node_ports
from kproxy.plan.nftables import naming
from kproxy.plan.nftables.ir import NftTable
from kproxy.plan.nftables.kept import NftPlanCache, TablePlan
from kproxy.plan.nftables.render import render_nft_table
from kproxy.plan.nftables.table import plan_nft_table
from kproxy.plan.node_plan import FamilyPlanner, NodePlan, PlanInput, assemble_node_plan

MODE = "nftables"

NftablesKernel = Mapping[int, NftTable]
NftablesPlan = NodePlan[NftablesKernel]


@dataclass
class NftablesPlanner(FamilyPlanner[NftablesKernel, TablePlan]):
    config: ProxyConfig
    _caches: dict[int, NftPlanCache] = field(default_factory=dict)

    def plan_family(self, given: PlanInput, family: int) -> TablePlan:
        cache = self._caches.setdefault(family, NftPlanCache())
        g = given
        return plan_nft_table(g.services, g.endpoints, g.node, g.config, family, cache)

    def assemble(self, given: PlanInput, planned: Mapping[int, TablePlan]) -> NftablesPlan:
        g = given
        tables = {family: p.table for family, p in planned.items()}
        rules = {naming.TABLE: sum(p.rules for p in planned.values())}
        localhost = plan_localhost_node_ports(g.services, g.endpoints, g.node, g.config, g.families)
        return assemble_node_plan(
            MODE, tables, g, planned.values(), rules, localhost_node_ports=localhost
        )


def render_nftables_plan(plan: NftablesPlan, family: int) -> str:
    """One family's planned table as `nft list table` prints it (`kproxy dump --manifests`)."""
    return render_nft_table(plan.kernel[family])
