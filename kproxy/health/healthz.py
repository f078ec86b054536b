"""`/healthz` and `/livez` on healthzBindAddress, with kube-proxy's semantics and JSON; and
kproxy's own read-only `/statusz` (what `kproxy status` shows; see docs/debugging.md).

kproxy is unhealthy when an update was queued more than `timeout` (2 x syncPeriod) ago and no
sync has succeeded since, and (beyond kube-proxy) while a source of objects reports a problem (its
thread ended, or it has not been current for too long) or the dataplane does (the userspace
relay's thread ended). Then the rules may be right for a cluster
that no longer exists, and `/livez` failing makes the kubelet restart the agent.

`/healthz` also answers 503 while the Node is being deleted or carries the cluster autoscaler's
ToBeDeletedByClusterAutoscaler taint, so load balancers drain it first; `/livez` ignores that, so
the kubelet does not restart a draining agent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer

from kproxy.health.http import JsonHandler, QuietServer
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
        healthy = all(bool(v["healthy"]) for v in families.values())
        healthy = healthy and not problems and not broken
        body: dict[str, object] = {
            "lastUpdated": _iso(last),
            "currentTime": _iso(now),
            "nodeEligible": self.node_eligible,
            "healthy": healthy,
            "status": families,
            "sources": {"healthy": not problems, "problems": problems},
            "dataplane": {"healthy": not broken, "problems": broken},
        }
        return healthy, body


class _HealthServer(QuietServer):
    def __init__(self, address: tuple[str, int], health: ProxyHealth, metrics: ProxyMetrics):
        self.health = health
        self.metrics = metrics
        super().__init__(address, _Handler)


class _Handler(JsonHandler):
    server: _HealthServer

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path not in ("/healthz", "/livez", "/statusz"):
            self.send_error(404)
            return
        healthy, body = self.server.health.status()
        if path == "/statusz":
            self.send_json(200, self.server.health.statusz(body))
            return
        if path == "/healthz":
            ok = healthy and self.server.health.node_eligible
            counter = self.server.metrics.healthz
        else:
            ok = healthy
            counter = self.server.metrics.livez
        code = 200 if ok else 503
        counter.labels(code=str(code)).inc()
        self.send_json(code, body)


def serve_health(
    address: tuple[str, int], health: ProxyHealth, metrics: ProxyMetrics
) -> ThreadingHTTPServer:
    """Start the /healthz and /livez server in a background thread."""
    server = _HealthServer(address, health, metrics)
    server.start("healthz")
    return server
