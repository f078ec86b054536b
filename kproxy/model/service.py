"""Services as kproxy sees them: one ServicePort per (service, port), kube-proxy's vocabulary."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
    # Hashed once: a name is a key of every per-port map, and the dataclass's own hash would
    # call three Python __hash__ methods (its own, NamespacedName's, the enum's) per lookup.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.service, self.port, self.protocol)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[ServicePortName], tuple[NamespacedName, str, Protocol]]:
        # Rebuilt (and hashed) where it is unpickled: string hashes differ between processes.
        return (ServicePortName, (self.service, self.port, self.protocol))

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
