"""Localhost NodePorts for the nftables mode (KEP-6032): the relay listens on 127.0.0.1 and ::1 at
each TCP NodePort the plan names (plan/localhost_nodeports.py) and carries each connection to an
endpoint. `WithLocalhostNodePorts` composes it with the mode's own dataplane: the table first,
then the listeners, in every sync."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, runtime_checkable

import structlog

from kproxy.dataplane.base import ApplyResult, ModeDataplane
from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.relay.spec import ListenerSpec
from kproxy.model.service import Protocol as L4Protocol
from kproxy.plan.localhost_nodeports import LocalhostNodePort
from kproxy.plan.node_plan import NodePlan

log = structlog.get_logger("kproxy.dataplane")


@runtime_checkable
class LocalhostNodePortStats(Protocol):
    """A dataplane that serves localhost NodePorts and counts them (the KEP's metrics)."""

    def localhost_node_port_counts(self) -> dict[int, dict[str, int]]:
        """Per family: `listeners`, `creation_failures` and `rejected` (TCP connections reset
        for want of an endpoint the NodePort's traffic policy allows)."""
        ...


class LocalhostNodePorts:
    """One relay per family; `sync(wanted)` makes its listeners the plan's."""

    def __init__(self, relays: Mapping[int, Relay]) -> None:
        self.relays = relays
        self._listeners = dict.fromkeys(relays, 0)
        self._creation_failures = dict.fromkeys(relays, 0)
        # Rejections counted by service ports the relay has since forgotten: the per-family
        # total stays monotonic as NodePorts come and go.
        self._retired_rejects = dict.fromkeys(relays, 0)
        self._warned: set[tuple[object, str]] = set()
        # A scrape (another thread) never sees a sync half counted.
        self._lock = threading.Lock()

    def sync(self, wanted: Sequence[LocalhostNodePort]) -> None:
        with self._lock:
            self._sync(wanted)

    def _sync(self, wanted: Sequence[LocalhostNodePort]) -> None:
        for family, relay in self.relays.items():
            specs: dict[Hashable, ListenerSpec] = {
                str(lnp.name): ListenerSpec(
                    L4Protocol.TCP, lnp.address, lnp.node_port, lnp.endpoints, lnp.affinity_seconds
                )
                for lnp in wanted
                if lnp.family == family
            }
            synced = relay.sync(specs)
            self._listeners[family] = len(synced.ports)
            self._retired_rejects[family] += sum(
                c.get("no_endpoint_rejects", 0) for c in synced.retired.values()
            )
            # Retried by every sync, and counted each time, as upstream counts them.
            self._creation_failures[family] += len(synced.errors)
            for key, error in synced.errors.items():
                if (key, error) not in self._warned:
                    self._warned.add((key, error))
                    log.warning(
                        "localhost_nodeport_listener_failed",
                        service=str(key),
                        node_port=specs[key].port,
                        family=family,
                        problem=error,
                    )

    def counts(self) -> dict[int, dict[str, int]]:
        with self._lock:
            return {
                family: {
                    "listeners": self._listeners[family],
                    "creation_failures": self._creation_failures[family],
                    "rejected": self._retired_rejects[family]
                    + sum(c.get("no_endpoint_rejects", 0) for c in relay.counters().values()),
                }
                for family, relay in self.relays.items()
            }

    def problems(self) -> list[str]:
        return [
            f"the IPv{family} localhost NodePort relay's thread has stopped"
            for family, relay in sorted(self.relays.items())
            if not relay.alive()
        ]


class WithLocalhostNodePorts:
    """A mode's dataplane plus the localhost NodePort listeners of each plan it applies."""

    def __init__(self, inner: ModeDataplane, localhost: LocalhostNodePorts) -> None:
        self.inner = inner
        self.localhost = localhost

    @property
    def families(self) -> tuple[int, ...]:
        return self.inner.families

    def reading_ahead(self) -> AbstractContextManager[None]:
        return self.inner.reading_ahead()

    def apply(self, plan: NodePlan[Any], full: bool) -> ApplyResult:
        result = self.inner.apply(plan, full)
        self.localhost.sync(plan.localhost_node_ports)
        return result

    def cleanup(self) -> ApplyResult:
        self.localhost.sync(())
        return self.inner.cleanup()

    def problems(self) -> list[str]:
        return [*self.inner.problems(), *self.localhost.problems()]

    def localhost_node_port_counts(self) -> dict[int, dict[str, int]]:
        return self.localhost.counts()


@contextmanager
def open_localhost_node_ports(families: Sequence[int]) -> Iterator[LocalhostNodePorts]:
    relays = {family: Relay(name=f"localhost-nodeport-relay-v{family}") for family in families}
    try:
        for relay in relays.values():
            relay.start()
        yield LocalhostNodePorts(relays)
    finally:
        for relay in relays.values():
            relay.stop()
