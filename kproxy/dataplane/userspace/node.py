"""The userspace mode's dataplane for a whole node: per family, the relay's listeners first (their
bound ports are what the portal rules redirect to), then the portal rules through the same
libiptc backend the iptables mode uses. A sync that programs the portals also deletes the
iptables mode's chains (and the jumps to them) in the same commit per table, so switching modes
is one atomic change per table."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any

import structlog

from kproxy.dataplane.base import ApplyResult, Dataplane
from kproxy.dataplane.iptables.families import open_dataplanes
from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.userspace.relay import Relay
from kproxy.dataplane.userspace.spec import ListenerSpec
from kproxy.model.config import ProxyConfig
from kproxy.plan.node_plan import NodePlan
from kproxy.plan.userspace.planner import UserspaceFamily, UserspaceKernel
from kproxy.plan.userspace.portals import Listener
from kproxy.rules.ir import Ruleset, Table

log = structlog.get_logger("kproxy.dataplane")


def listener_spec(listener: Listener) -> ListenerSpec:
    """What the relay needs of a planned listener."""
    return ListenerSpec(
        listener.protocol,
        listener.bind_address,
        0,
        tuple((ep.ip, ep.port) for ep in listener.endpoints),
        listener.affinity_seconds,
    )


def portal_ruleset(part: UserspaceFamily, ports: Mapping[Any, int]) -> Ruleset:
    """The portal rules, plus an empty mangle table: the iptables mode's canary chain there is
    deleted like its other chains when a node switches to userspace."""
    ruleset = part.ruleset(ports)
    return replace(ruleset, tables=(*ruleset.tables, Table("mangle")))


class UserspaceNode:
    mode = "userspace"

    def __init__(self, dataplanes: Mapping[int, Dataplane], relays: Mapping[int, Relay]) -> None:
        # The portal rules go through the iptables mode's node dataplane (no sysctls needed).
        self.rules = IptablesNode(dataplanes, write_sysctls=lambda sysctls: None)
        self.relays = relays
        self._warned: set[Any] = set()

    @property
    def families(self) -> tuple[int, ...]:
        return self.rules.families

    def reading_ahead(self) -> AbstractContextManager[None]:
        return self.rules.reading_ahead()

    def apply(self, plan: NodePlan[UserspaceKernel], full: bool) -> ApplyResult:
        for skipped in plan.kernel.skipped:
            if skipped.name not in self._warned:
                self._warned.add(skipped.name)
                log.warning(
                    "service_port_skipped", service=str(skipped.name), reason=skipped.reason
                )
        result = ApplyResult()
        for family, part in sorted(plan.kernel.families.items()):
            synced = self.relays[family].sync(
                {lis.key: listener_spec(lis) for lis in part.listeners}
            )
            for key, error in synced.errors.items():
                if (family, key, error) not in self._warned:
                    self._warned.add((family, key, error))
                    log.warning("listener_failed", service=str(key), family=family, error=error)
            ruleset = portal_ruleset(part, synced.ports)
            result.tables.extend(self.rules.dataplanes[family].apply(ruleset, full).tables)
        return result

    def cleanup(self) -> ApplyResult:
        return self.rules.cleanup()

    def counters(self) -> dict[int, dict[Any, dict[str, int]]]:
        return {family: relay.counters() for family, relay in self.relays.items()}


@contextmanager
def open_userspace_node(config: ProxyConfig, lock_timeout: float) -> Iterator[UserspaceNode]:
    with open_dataplanes(lock_timeout) as dataplanes:
        relays = {
            family: Relay(port_range=config.port_range, udp_idle_timeout=config.udp_idle_timeout)
            for family in dataplanes
        }
        try:
            for relay in relays.values():
                relay.start()
            yield UserspaceNode(dataplanes, relays)
        finally:
            for relay in relays.values():
                relay.stop()
