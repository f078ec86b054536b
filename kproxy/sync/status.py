"""What the running agent tells `kproxy status` (the read-only `/statusz` JSON on the metrics
address): its mode, its last syncs, what it programs, what it skipped, and its sources."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from kproxy.health.healthz import FAMILY_NAMES
from kproxy.watch.supervisor import Supervisor

_DURATIONS_KEPT = 1000  # the last syncs the percentiles are taken over
_SKIPPED_KEPT = 100


def _iso(ts: float) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds") if ts else None


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-int(fraction * 1000) * len(ordered) // 1000))  # ceil(fraction * n)
    return ordered[min(rank, len(ordered)) - 1]


class SyncStatus:
    """Facts the sync loop and the state box report, read by /statusz from another thread."""

    def __init__(
        self, mode: str, families: tuple[int, ...], clock: Callable[[], float] = time.time
    ) -> None:
        self.mode = mode
        self.families = families
        self.clock = clock
        self.started_at = clock()
        self.sources: Sequence[Supervisor] = ()
        self.iptables_backend: str | None = None  # "legacy"/"nft" in the x_tables modes
        self._lock = threading.Lock()
        self._durations: deque[float] = deque(maxlen=_DURATIONS_KEPT)
        self._last_sync: dict[str, Any] | None = None
        self._programmed: dict[str, Any] = {}
        self._syncs = 0
        self._failures = 0
        self._last_error: dict[str, Any] | None = None
        self._skipped: dict[str, dict[str, Any]] = {}

    def synced(
        self,
        facts: dict[str, Any],
        programmed: dict[str, Any],
        seconds: float,
        valid: frozenset[str] = frozenset(),
    ) -> None:
        """A successful sync; `valid` names objects it programmed (`Service ns/name`): one that
        was skipped before has been fixed since, and is no longer listed."""
        with self._lock:
            for obj in valid & self._skipped.keys():
                del self._skipped[obj]
            self._syncs += 1
            self._durations.append(seconds)
            self._last_sync = {"at": _iso(self.clock()), "seconds": round(seconds, 4), **facts}
            self._programmed = programmed

    def failed(self, error: str, full: bool) -> None:
        with self._lock:
            self._failures += 1
            self._last_error = {"at": _iso(self.clock()), "error": error, "fullSync": full}

    def skipped(self, kind: str, obj: str, field: str, problem: str) -> None:
        """An object left out, as last seen (the newest reason per object)."""
        with self._lock:
            self._skipped.pop(obj, None)
            self._skipped[obj] = {
                "kind": kind,
                "object": obj,
                "field": field,
                "problem": problem,
                "at": _iso(self.clock()),
            }
            while len(self._skipped) > _SKIPPED_KEPT:
                self._skipped.pop(next(iter(self._skipped)))

    def _source(self, source: Supervisor, timeout: float) -> dict[str, Any]:
        return {
            "name": source.source,
            "problem": source.problem(timeout),
            "secondsSinceCurrent": round(source.seconds_since_current(), 3),
            "restarts": max(0, source.runs - 1),
            "failures": source.failures,
            "lastError": source.last_error or None,
        }

    def body(self, health: dict[str, object], timeout: float) -> dict[str, Any]:
        with self._lock:
            durations = list(self._durations)
            body: dict[str, Any] = {
                "mode": self.mode,
                "families": [FAMILY_NAMES[f] for f in self.families],
                "iptablesBackend": self.iptables_backend,
                "startedAt": _iso(self.started_at),
                "currentTime": _iso(self.clock()),
                "healthy": health.get("healthy"),
                "lastSync": self._last_sync,
                "syncs": {
                    "count": self._syncs,
                    "failures": self._failures,
                    "p50Seconds": percentile(durations, 0.5),
                    "p99Seconds": percentile(durations, 0.99),
                },
                "programmed": self._programmed,
                "skipped": list(self._skipped.values()),
                "lastError": self._last_error,
            }
        body["sources"] = [self._source(s, timeout) for s in self.sources]
        return body
