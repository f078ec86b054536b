"""The nftables mode's planner: services, endpoints and the node -> a NodePlan whose kernel part
is one `kube-proxy` table per address family, plus the facts the rest of the agent acts on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import ServicePort, ServicePortName
from kproxy.plan.conntrack import serving_sources
from kproxy.plan.iptables.planner import health_check_addresses
from kproxy.plan.localhost_nodeports import plan_localhost_node_ports
from kproxy.plan.nftables.ir import NftTable
from kproxy.plan.nftables.kept import NftPlanCache
from kproxy.plan.nftables.render import render_nft_table
from kproxy.plan.nftables.table import plan_nft_table
from kproxy.plan.node_plan import NodePlan, PlanStats, plan_health_checks

MODE = "nftables"

NftablesKernel = Mapping[int, NftTable]
NftablesPlan = NodePlan[NftablesKernel]


@dataclass
class NftablesPlanner:
    config: ProxyConfig
    _caches: dict[int, NftPlanCache] = field(default_factory=dict)

    def plan(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
        node: NodeInfo,
        families: tuple[int, ...],
    ) -> NftablesPlan:
        tables: dict[int, NftTable] = {}
        no_local = [0, 0]
        rules = 0
        for family in families:
            cache = self._caches.setdefault(family, NftPlanCache())
            planned = plan_nft_table(services, endpoints, node, self.config, family, cache)
            tables[family] = planned.table
            no_local[0] += planned.no_local_internal
            no_local[1] += planned.no_local_external
            rules += planned.rules
        return NodePlan(
            mode=MODE,
            kernel=tables,
            families=families,
            health_check_addresses=health_check_addresses(self.config, node),
            health_checks=plan_health_checks(services, endpoints, node),
            udp_serving={f: serving_sources(services, endpoints, f) for f in families},
            stats=PlanStats(no_local[0], no_local[1], {"kube-proxy": rules}),
            localhost_node_ports=plan_localhost_node_ports(
                services, endpoints, node, self.config, families
            ),
        )


def render_nftables_plan(plan: NftablesPlan, family: int) -> str:
    """One family's planned table as `nft list table` prints it (`kproxy dump --manifests`)."""
    return render_nft_table(plan.kernel[family])
