"""Caps on what the relay carries at once (TCP connections and UDP client mappings), per
listener and in total, so that one service's flood can neither take every descriptor of the
agent nor starve another service's connections (upstream's relay had no cap)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from kproxy.dataplane.relay.spec import ServicePortCounters

log = structlog.get_logger("kproxy.dataplane")

# A spliced TCP connection holds six descriptors: two sockets and two pipes.
DESCRIPTORS_PER_CONNECTION = 6
# Each relay (one per address family) may fill at most a quarter of the open-file limit: the
# rest is for the other family's relay, the listeners, held ports, watches, servers, netlink.
SHARE_OF_LIMIT = 4
# One listener may take at most this fraction of its relay's total.
LISTENERS_TO_FILL_TOTAL = 4
# Refusals this far apart are two runs, each logged once.
QUIET_SECONDS = 60.0


@dataclass(frozen=True)
class CapLimits:
    """At most `total` connections and UDP mappings in one relay, `per_listener` in one."""

    total: int
    per_listener: int


def default_limits(open_files: int | None = None) -> CapLimits:
    """From the soft RLIMIT_NOFILE (read after the relay raised it to the hard limit)."""
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if open_files == resource.RLIM_INFINITY:
            open_files = 1 << 20
    total = max(1, open_files // (DESCRIPTORS_PER_CONNECTION * SHARE_OF_LIMIT))
    return CapLimits(total, max(1, total // LISTENERS_TO_FILL_TOTAL))


class ConnectionCaps:
    """Admits a connection (or UDP mapping) or refuses it; used only on the relay's loop.

    A listener's live count is its counters' `active_connections`, which outlives a listener
    reopened under the same key; the total is kept here."""

    def __init__(self, limits: CapLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.active = 0
        self._clock = clock
        self._last_refused: dict[str, float] = {}  # per reason

    def admit(self, counters: ServicePortCounters) -> bool:
        if counters.active_connections >= self.limits.per_listener:
            counters.refused_service_cap += 1
            self._refused("service_cap", self.limits.per_listener)
            return False
        if self.active >= self.limits.total:
            counters.refused_total_cap += 1
            self._refused("total_cap", self.limits.total)
            return False
        self.active += 1
        counters.active_connections += 1
        return True

    def release(self, counters: ServicePortCounters) -> None:
        self.active -= 1
        counters.active_connections -= 1

    def _refused(self, reason: str, limit: int) -> None:
        # A run of refusals is one line: a flood at a cap alternates admits (as connections
        # end) with refusals, so only a quiet spell without refusals ends the run.
        now = self._clock()
        last = self._last_refused.get(reason)
        self._last_refused[reason] = now
        if last is None or now - last >= QUIET_SECONDS:
            log.warning(
                "relay_connection_refused",
                reason=reason,
                limit=limit,
                hint="a service port or the relay carries as many connections as its cap; "
                "new ones are reset (UDP: dropped) until some end",
            )
