"""The userspace mode's dataplane for a whole node: per family, the relay's listeners first (their
bound ports are what the portal rules redirect to), then the portal rules through the x_tables
writer (dataplane/xtables/), as the iptables mode's rules go. A sync that programs the portals
also deletes the iptables mode's chains (and the jumps to them) in the same commit per table, so
switching between the two is one atomic change per table."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any

import structlog

from kproxy.dataplane.base import ApplyResult, Dataplane
from kproxy.dataplane.host import SysctlWriter, apply_sysctls
from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.relay.spec import ListenerSpec
from kproxy.dataplane.userspace.holds import HeldPort, PortHolds
from kproxy.dataplane.xtables.families import FamilyTables, open_dataplanes
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


def service_port_of(key: Hashable) -> str:
    """The service port a relay key (a planned listener's ListenerKey) belongs to."""
    return str(key[0]) if isinstance(key, tuple) else str(key)


class UserspaceNode:
    def __init__(
        self,
        dataplanes: Mapping[int, Dataplane],
        relays: Mapping[int, Relay],
        write_sysctls: SysctlWriter = apply_sysctls,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = FamilyTables(dataplanes)  # the portal rules (they need no sysctls)
        self.relays = relays
        self.holds = {family: PortHolds() for family in relays}
        self.write_sysctls = write_sysctls  # the iptables mode's, at hand-over
        self.clock = clock
        self._warned: set[Any] = set()

    @property
    def families(self) -> tuple[int, ...]:
        return self.rules.families

    def reading_ahead(self) -> AbstractContextManager[None]:
        return self.rules.reading_ahead()

    def apply(self, plan: NodePlan[UserspaceKernel], full: bool) -> ApplyResult:
        """Per family: the listeners first (the rules need their ports), then the portal rules,
        then the ports held for them."""
        for skipped in plan.kernel.skipped:
            self._warn_once("service_port_skipped", skipped.name, skipped.reason)
        result = ApplyResult()
        for family, part in sorted(plan.kernel.families.items()):
            synced = self.relays[family].sync(
                {lis.key: listener_spec(lis) for lis in part.listeners}
            )
            for key, error in synced.errors.items():
                self._warn_once("listener_failed", service_port_of(key), error, family=family)
            ruleset = portal_ruleset(part, synced.ports)
            result.tables.extend(self.rules.dataplanes[family].apply(ruleset, full).tables)
            held = [
                HeldPort(lis.protocol, family, address, port)
                for lis in part.listeners
                for address, port in lis.held_ports
            ]
            for port, error in self.holds[family].sync(held).items():
                self._warn_once("port_hold_failed", port, error, family=family)
        return result

    def _warn_once(self, event: str, subject: object, problem: str, **keys: Any) -> None:
        if (event, subject, problem) not in self._warned:
            self._warned.add((event, subject, problem))
            log.warning(event, service=str(subject), problem=problem, **keys)

    def cleanup(self) -> ApplyResult:
        return self.rules.cleanup()

    def problems(self) -> list[str]:
        return [
            f"the IPv{family} userspace relay's thread has stopped"
            for family, relay in sorted(self.relays.items())
            if not relay.alive()
        ]

    def service_port_counters(self) -> dict[str, dict[str, int]]:
        """Summed over families and listeners, per service port."""
        totals: dict[str, dict[str, int]] = {}
        for relay in self.relays.values():
            for key, values in relay.counters().items():
                total = totals.setdefault(service_port_of(key), {})
                for counter, value in values.items():
                    total[counter] = total.get(counter, 0) + value
        return totals

    def hand_over(self, plan: NodePlan[Mapping[int, Ruleset]]) -> ApplyResult:
        """Replace the portals with the iptables mode's rules for the same services, in one
        commit per table, before the relay stops: connections keep working after the process
        has gone (and the next agent, of either mode, takes over from rules that work)."""
        self.write_sysctls(plan.sysctls)
        result = self.rules.apply(plan.kernel, full=True)
        for holds in self.holds.values():
            holds.close()
        return result

    def drain(self, timeout: float) -> int:
        """Wait until the relay has no connection left, at most `timeout` seconds; returns how
        many were still open."""
        deadline = self.clock() + timeout
        while True:
            active = sum(
                v.get("active_connections", 0) for v in self.service_port_counters().values()
            )
            if not active or self.clock() >= deadline:
                return active
            time.sleep(0.05)


@contextmanager
def open_userspace_node(config: ProxyConfig, lock_timeout: float) -> Iterator[UserspaceNode]:
    with open_dataplanes(lock_timeout) as dataplanes:
        relays = {
            family: Relay(port_range=config.port_range, udp_idle_timeout=config.udp_idle_timeout)
            for family in dataplanes
        }
        node = UserspaceNode(dataplanes, relays)
        try:
            for relay in relays.values():
                relay.start()
            yield node
        finally:
            for holds in node.holds.values():
                holds.close()
            for relay in relays.values():
                relay.stop()
