"""Services as kproxy sees them: one ServicePort per (service, port), kube-proxy's vocabulary."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Protocol(enum.Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def lower(self) -> str:
        return _LOWER[self]


_LOWER = {p: p.value.lower() for p in Protocol}


@dataclass(frozen=True, slots=True, order=True)
class NamespacedName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """`namespace/name:port` (`:port` only when the port is named) plus the protocol."""

    service: NamespacedName
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.service}:{self.port}" if self.port else str(self.service)


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one Service, with everything the planner needs and nothing from the API."""

    name: ServicePortName
    cluster_ips: tuple[str, ...]
    port: int
    node_port: int = 0
    session_affinity_seconds: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol
