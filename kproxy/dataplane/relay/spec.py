"""What the relay is asked to run (ListenerSpec) and what it counts (ServicePortCounters)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from kproxy.dataplane.relay.balancer import EndpointAddr
from kproxy.model.service import Protocol

# Upstream's dial attempts: the growing timeout is the only backoff between them.
DIAL_TIMEOUTS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
UDP_IDLE_TIMEOUT = 0.25

# A ServicePortName in the agent; anything hashable in tests.
ListenerKey = Hashable


@dataclass(frozen=True)
class ListenerSpec:
    """One service port's listener. `port` 0 means the relay's allocator (or the kernel) picks."""

    protocol: Protocol
    bind_address: str = "0.0.0.0"
    port: int = 0
    endpoints: tuple[EndpointAddr, ...] = ()
    affinity_seconds: int | None = None

    def same_listener(self, other: ListenerSpec) -> bool:
        """Whether `other` can be served by this spec's socket (only endpoints/affinity differ)."""
        return (self.protocol, self.bind_address, self.port) == (
            other.protocol,
            other.bind_address,
            other.port,
        )


@dataclass
class ServicePortCounters:
    """Plain numbers the health layer reads; written only by the relay's loop thread."""

    active_connections: int = 0
    connections_total: int = 0
    bytes_to_endpoint: int = 0
    bytes_to_client: int = 0
    dial_failures: int = 0
    no_endpoint_rejects: int = 0
    udp_mappings: int = 0
    udp_datagrams_dropped: int = 0
    # Sockets the kernel refused (EMFILE and the like): that connection or datagram was dropped.
    socket_failures: int = 0
    # Connections reset (UDP: datagrams dropped) at the relay's caps, by which cap.
    refused_service_cap: int = 0
    refused_total_cap: int = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class SyncResult:
    """The bound port of each listener that runs, why the others do not, and the last counters
    of service ports this sync forgot (removed, with no connection left): a caller summing
    counters over service ports adds these to stay monotonic."""

    ports: dict[ListenerKey, int] = field(default_factory=dict)
    errors: dict[ListenerKey, str] = field(default_factory=dict)
    retired: dict[ListenerKey, dict[str, int]] = field(default_factory=dict)
