"""The node plan: everything a proxy mode's planner decides for one node, in one value.

Each mode has its own kernel part (the iptables mode: one Ruleset per address family); the rest
is shared, so the sync loop, conntrack cleanup, health and metrics act on it the same way for
every mode instead of working it out again themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, ServicePort, ServicePortName
from kproxy.plan.conntrack import UdpServing
from kproxy.plan.localhost_nodeports import LocalhostNodePort

KernelPart = TypeVar("KernelPart")


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
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
        node: NodeInfo,
        families: tuple[int, ...],
    ) -> NodePlan[KernelPart]: ...


def plan_health_checks(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    node: NodeInfo,
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
