"""The node plan: everything a proxy mode's planner decides for one node, in one value.

Each mode has its own kernel part (the iptables mode: one Ruleset per address family); the rest
is shared, so the sync loop, conntrack cleanup, health and metrics act on it the same way for
every mode instead of working it out again themselves. `assemble_node_plan` adds that shared
rest to a mode's kernel part.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, ServicePort, ServicePortName
from kproxy.plan.conntrack import UdpServing, serving_sources
from kproxy.plan.localhost_nodeports import LocalhostNodePort
from kproxy.plan.node_ports import health_check_addresses

KernelPart = TypeVar("KernelPart")
FamilyPart = TypeVar("FamilyPart")
# What a planner reads: state's maps, read-only.
ServicePortMap = Mapping[ServicePortName, ServicePort]
EndpointsMap = Mapping[ServicePortName, tuple[Endpoint, ...]]
Families = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HealthCheckServer:
    """A healthCheckNodePort listener: upstream answers 200 while the service has local
    endpoints, 503 otherwise."""

    service: NamespacedName
    port: int
    local_endpoints: int


@dataclass(frozen=True, slots=True)
class PlanStats:
    """Facts for metrics, not for the kernel."""

    # Service ports with a Local traffic policy whose endpoints are all on other nodes
    # (upstream's sync_proxy_rules_no_local_endpoints_total).
    no_local_internal: int = 0
    no_local_external: int = 0
    rules: Mapping[str, int] = field(default_factory=dict)  # per table, all the mode owns


@dataclass(frozen=True)
class NodePlan(Generic[KernelPart]):
    mode: str
    kernel: KernelPart
    families: tuple[int, ...]
    sysctls: tuple[tuple[str, str], ...] = ()  # (name under /proc/sys, value), in order
    health_check_addresses: tuple[str, ...] = ()
    health_checks: tuple[HealthCheckServer, ...] = ()
    udp_serving: Mapping[int, UdpServing] = field(default_factory=dict)  # per family
    stats: PlanStats = field(default_factory=PlanStats)
    # The nftables mode's relay listeners on 127.0.0.1/::1 (plan/localhost_nodeports.py).
    localhost_node_ports: tuple[LocalhostNodePort, ...] = ()


class Planner(Protocol[KernelPart]):
    """A mode's planner: the same input gives the same plan (a cache may make it faster, never
    different)."""

    def plan(
        self, services: ServicePortMap, endpoints: EndpointsMap, node: NodeInfo, families: Families
    ) -> NodePlan[KernelPart]: ...


@dataclass(frozen=True, slots=True)
class PlanInput:
    """One plan's input, as every planner gets it, with the planner's config."""

    services: ServicePortMap
    endpoints: EndpointsMap
    node: NodeInfo
    families: Families
    config: ProxyConfig


class FamilyPlanner(ABC, Generic[KernelPart, FamilyPart]):
    """A Planner that plans each family on its own, then assembles the node plan from the
    families' parts (with assemble_node_plan): what every mode's planner does."""

    config: ProxyConfig

    def plan(
        self, services: ServicePortMap, endpoints: EndpointsMap, node: NodeInfo, families: Families
    ) -> NodePlan[KernelPart]:
        given = PlanInput(services, endpoints, node, families, self.config)
        return self.assemble(
            given, {family: self.plan_family(given, family) for family in families}
        )

    @abstractmethod
    def plan_family(self, given: PlanInput, family: int) -> FamilyPart: ...

    @abstractmethod
    def assemble(
        self, given: PlanInput, planned: Mapping[int, FamilyPart]
    ) -> NodePlan[KernelPart]: ...


class NoLocalCounts(Protocol):
    """One family's count of service ports without local endpoints (see PlanStats)."""

    @property
    def no_local_internal(self) -> int: ...

    @property
    def no_local_external(self) -> int: ...


def assemble_node_plan(
    mode: str,
    kernel: KernelPart,
    given: PlanInput,
    per_family: Iterable[NoLocalCounts],
    rules: Mapping[str, int],
    sysctls: tuple[tuple[str, str], ...] = (),
    udp_serving: Mapping[int, UdpServing] | None = None,
    localhost_node_ports: tuple[LocalhostNodePort, ...] = (),
) -> NodePlan[KernelPart]:
    """A mode's kernel part with what every mode's plan holds besides: the health-check servers
    and their addresses, the UDP conntrack facts (the endpoints serving each service, unless
    the mode says otherwise) and the stats."""
    counts = list(per_family)
    if udp_serving is None:
        udp_serving = {
            f: serving_sources(given.services, given.endpoints, f) for f in given.families
        }
    return NodePlan(
        mode=mode,
        kernel=kernel,
        families=given.families,
        sysctls=sysctls,
        health_check_addresses=health_check_addresses(given.config, given.node),
        health_checks=plan_health_checks(given.services, given.endpoints, given.node),
        udp_serving=udp_serving,
        stats=PlanStats(
            sum(c.no_local_internal for c in counts),
            sum(c.no_local_external for c in counts),
            rules,
        ),
        localhost_node_ports=localhost_node_ports,
    )


def plan_health_checks(
    services: ServicePortMap, endpoints: EndpointsMap, node: NodeInfo
) -> tuple[HealthCheckServer, ...]:
    """One listener per service with a healthCheckNodePort, counting its ready endpoints on this
    node (each address once, over all its ports)."""
    ports: dict[NamespacedName, int] = {}
    local: dict[NamespacedName, set[str]] = {}
    for spn, sp in services.items():
        if not sp.health_check_node_port:
            continue
        ports[spn.service] = sp.health_check_node_port
        local.setdefault(spn.service, set()).update(
            ep.ip for ep in endpoints.get(spn, ()) if ep.ready and ep.node_name == node.name
        )
    return tuple(
        HealthCheckServer(key, ports[key], len(local[key])) for key in sorted(ports, key=str)
    )
