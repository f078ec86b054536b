"""`/healthz` and `/livez` on healthzBindAddress, with kube-proxy's semantics and JSON (and
nothing else there: kproxy's own `/statusz` is served on the metrics address, see
metrics_server.py).

kproxy is unhealthy when an update was queued more than `timeout` (2 x syncPeriod) ago and no
sync has succeeded since, and (beyond kube-proxy) while a source of objects reports a problem (its
thread ended, or it has not been current for too long) or the dataplane does (the userspace
relay's thread ended) or the sync loop's thread has ended. Then the rules may be right for a
cluster that no longer exists, and `/livez` failing makes the kubelet restart the agent.

`/healthz` also answers 503 while the Node is being deleted or carries the cluster autoscaler's
ToBeDeletedByClusterAutoscaler taint, so load balancers drain it first; `/livez` ignores that, so
the kubelet does not restart a draining agent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from kproxy.health.http import HttpServer, Request, Response, json_response
from kproxy.health.metrics import ProxyMetrics

FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC") if ts else ""


class ProxyHealth:
    """Tracks, per family, when an update was first queued and when a sync last succeeded."""

    def __init__(
        self,
        timeout: float,
        families: tuple[int, ...] = (4,),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = timeout
        self.clock = clock
        self.node_eligible = True
        # The sources' problems (none while they are current), and the dataplane's (a relay
        # thread that ended); wired in by the agent.
        self.source_problems: Callable[[], list[str]] = list
        self.dataplane_problems: Callable[[], list[str]] = list
        # The agent's facts for /statusz (sync/status.py), given /healthz's body; wired in by
        # the agent. Read-only: nothing a request sends changes anything.
        self.statusz: Callable[[dict[str, object]], dict[str, object]] = lambda health: health
        # The thread running the sync loop, once it runs (SyncLoop.run sets it).
        self.sync_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_updated = dict.fromkeys(families, 0.0)
        self._oldest_queued = dict.fromkeys(families, 0.0)

    def queued(self) -> None:
        """A change arrived that the rules do not reflect yet."""
        now = self.clock()
        with self._lock:
            for family, since in self._oldest_queued.items():
                if not since:
                    self._oldest_queued[family] = now

    def updated(self, family: int) -> None:
        """A sync of `family` succeeded."""
        with self._lock:
            self._last_updated[family] = self.clock()
            self._oldest_queued[family] = 0.0

    def family_healthy(self, family: int, now: float) -> bool:
        since = self._oldest_queued[family]
        return not since or now - since < self.timeout

    def status(self) -> tuple[bool, dict[str, object]]:
        now = self.clock()
        with self._lock:
            families = {
                FAMILY_NAMES[f]: {
                    "lastUpdated": _iso(self._last_updated[f]),
                    "healthy": self.family_healthy(f, now),
                }
                for f in self._last_updated
            }
            last = max(self._last_updated.values())
        problems = self.source_problems()
        broken = self.dataplane_problems()
        loop = self.sync_problems()
        healthy = all(bool(v["healthy"]) for v in families.values())
        healthy = healthy and not problems and not broken and not loop
        body: dict[str, object] = {
            "lastUpdated": _iso(last),
            "currentTime": _iso(now),
            "nodeEligible": self.node_eligible,
            "healthy": healthy,
            "status": families,
            "sources": {"healthy": not problems, "problems": problems},
            "dataplane": {"healthy": not broken, "problems": broken},
            "syncLoop": {"healthy": not loop, "problems": loop},
        }
        return healthy, body

    def sync_problems(self) -> list[str]:
        thread = self.sync_thread
        if thread is not None and not thread.is_alive():
            return [f"the sync loop's thread {thread.name!r} has ended; no rule is updated"]
        return []


def serve_health(
    address: tuple[str, int], health: ProxyHealth, metrics: ProxyMetrics
) -> HttpServer:
    """Start the /healthz and /livez server (only those: /statusz is on the metrics address)."""

    def answer(request: Request) -> Response:
        if request.path not in ("/healthz", "/livez"):
            return Response(404)
        healthy, body = health.status()
        if request.path == "/healthz":
            ok = healthy and health.node_eligible
            counter = metrics.healthz
        else:
            ok = healthy
            counter = metrics.livez
        code = 200 if ok else 503
        counter.labels(code=str(code)).inc()
        return json_response(code, body)

    return HttpServer.serving("healthz", address, answer, metrics.accept_error_counter("healthz"))
