"""The agent's sync loop: coalesce changes, honour minSyncPeriod and syncPeriod, and run each sync
as three named steps: plan, apply, report.

Sources (API watches or manifest files) report into a StateBox from their own threads; the loop
owns the dataplane (python-iptables is not thread-safe) and is the only writer of rules.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field

import structlog

from kproxy.dataplane.base import ApplyResult, Dataplane
from kproxy.errors import KproxyError
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.health.service_health import ServiceHealthServers
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.iptables.ruleset import PlanCache, build_node_ruleset
from kproxy.rules.ir import Ruleset
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import Mutation
from kproxy.sync.gcpause import gc_paused

log = structlog.get_logger("kproxy.sync")

# A full sync (compare every chain with the kernel) runs at least this often, as upstream's.
FULL_SYNC_PERIOD = 3600.0


class StateBox:
    """The cluster state behind a lock, and the signal that something changed. It is the Sink
    every source reports into."""

    def __init__(self, node_name: str, health: ProxyHealth, metrics: ProxyMetrics) -> None:
        self.state = ClusterState()
        self.state.node = NodeInfo(name=node_name)
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.health = health
        self.metrics = metrics
        self._synced: set[Kind] = set()
        self._node_labels: dict[str, str] | None = None
        self.node_labels_changed = False

    def apply(self, mutation: Mutation) -> None:
        with self.lock:
            skipped = mutation.apply_to(self.state)
            if Kind.NODE in mutation.kinds:
                self._note_node(self.state.node)
        for kind, exc in skipped:
            self.metrics.objects_skipped.labels(kind=kind.value).inc()
            log.warning("object_skipped", object=exc.obj, field=exc.field, problem=exc.problem)
        if Kind.SERVICE in mutation.kinds:
            self.metrics.service_changes_total.inc()
            self.metrics.service_changes_pending.inc()
        if Kind.ENDPOINT_SLICE in mutation.kinds:
            self.metrics.endpoint_changes_total.inc()
            self.metrics.endpoint_changes_pending.inc()
        self.metrics.last_queued.set_to_current_time()
        self.health.queued()
        self.changed.set()

    def _note_node(self, node: NodeInfo | None) -> None:
        labels = dict(node.labels) if node else {}
        if self._node_labels is not None and labels != self._node_labels:
            self.node_labels_changed = True  # topology may differ: resync everything
        self._node_labels = labels
        self.health.node_eligible = not (node and node.draining)

    def synced(self, kind: Kind) -> None:
        with self.lock:
            self._synced.add(kind)
        self.changed.set()

    @property
    def ready(self) -> bool:
        """No rule is written before Services and EndpointSlices have been listed once."""
        with self.lock:
            return {Kind.SERVICE, Kind.ENDPOINT_SLICE} <= self._synced


@dataclass
class Snapshot:
    services: dict[ServicePortName, ServicePort]
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]]
    node: NodeInfo
    changed: set[NamespacedName]
    trigger_times: list[float]
    full: bool


@dataclass
class SyncLoop:
    box: StateBox
    config: ProxyConfig
    dataplanes: Mapping[int, Dataplane]
    metrics: ProxyMetrics
    health: ProxyHealth
    host_facts: Callable[[NodeInfo], NodeInfo] = lambda node: node
    after_sync: Callable[[Snapshot], None] = lambda snapshot: None
    service_health: ServiceHealthServers | None = None
    started_at: float = field(default_factory=time.time)
    _needs_full: bool = True
    _last_end: float = 0.0
    _last_full: float = 0.0
    _plan_caches: dict[int, PlanCache] = field(default_factory=dict)
    # The last successful plan and what it was made from: reused while nothing changed.
    _last_plan: tuple[NodeInfo, dict[int, Ruleset]] | None = None

    def run(self, stop: threading.Event) -> None:
        """Sync until `stop` is set: after changes (no sooner than minSyncPeriod after the last
        sync), at least every syncPeriod, and sooner after a failure."""
        while not stop.is_set():
            self.box.changed.wait(timeout=self.config.sync_period)
            if stop.is_set():
                return
            if not self.box.ready:
                continue
            wait = self._last_end + self.config.min_sync_period - time.monotonic()
            if wait > 0 and stop.wait(wait):
                return
            self.box.changed.clear()
            self.sync()

    def sync(self) -> bool:
        """One sync: plan, apply, report. Returns whether it succeeded."""
        snapshot = self._take_snapshot()
        started = time.monotonic()
        try:
            with gc_paused(), self._reading_ahead(snapshot):
                rulesets = self.plan(snapshot)
                results = self.apply(rulesets, snapshot.full)
        except KproxyError as exc:
            self._needs_full = True
            self._last_plan = None
            self.metrics.restore_failures.inc()
            if not snapshot.full:
                self.metrics.partial_restore_failures.inc()
            log.error("sync_failed", error=str(exc), full_sync=snapshot.full)
            with self.box.lock:  # the changes were taken: keep them for the retry
                self.box.state.restore_changes(snapshot.changed)
            self.box.changed.set()
            self._last_end = time.monotonic()
            return False
        self.report(snapshot, rulesets, results, time.monotonic() - started)
        self._last_end = time.monotonic()
        return True

    def _reading_ahead(self, snapshot: Snapshot) -> ExitStack:
        """A partial sync with changes will commit from kept copies: let each dataplane read
        the kernel's proof while the plan is made."""
        stack = ExitStack()
        if snapshot.changed and not snapshot.full:
            for dataplane in self.dataplanes.values():
                stack.enter_context(dataplane.reading_ahead())
        return stack

    def _take_snapshot(self) -> Snapshot:
        self.metrics.service_changes_pending.set(0)
        self.metrics.endpoint_changes_pending.set(0)
        with self.box.lock:
            state = self.box.state
            hourly = time.monotonic() - self._last_full >= FULL_SYNC_PERIOD
            full = self._needs_full or self.box.node_labels_changed or hourly
            self.box.node_labels_changed = False
            snapshot = Snapshot(
                services=state.services_map(),
                endpoints=state.endpoints_map(),
                node=state.node or NodeInfo(name=""),
                changed=state.take_changes(),
                trigger_times=state.take_trigger_times(),
                full=full,
            )
        snapshot.node = self.host_facts(snapshot.node)
        return snapshot

    def plan(self, snapshot: Snapshot) -> dict[int, Ruleset]:
        last = self._last_plan
        if last is not None and not snapshot.changed and last[0] == snapshot.node:
            return last[1]  # nothing changed: the same rulesets (the dataplane then skips them)
        return {
            family: build_node_ruleset(
                snapshot.services,
                snapshot.endpoints,
                snapshot.node,
                self.config,
                family,
                self._plan_caches.setdefault(family, PlanCache()),
            )
            for family in self.dataplanes
        }

    def apply(self, rulesets: Mapping[int, Ruleset], full: bool) -> dict[int, ApplyResult]:
        return {family: self.dataplanes[family].apply(rs, full) for family, rs in rulesets.items()}

    def report(
        self,
        snapshot: Snapshot,
        rulesets: Mapping[int, Ruleset],
        results: Mapping[int, ApplyResult],
        seconds: float,
    ) -> None:
        self._needs_full = False
        self._last_plan = (snapshot.node, dict(rulesets))
        if snapshot.full:
            self._last_full = time.monotonic()
        # A partial sync turns full where a table changed behind kproxy's back and was read.
        full = snapshot.full or any(r.read_kernel for r in results.values())
        m = self.metrics
        m.sync_duration.observe(seconds)
        (m.full_sync_duration if full else m.partial_sync_duration).observe(seconds)
        m.last_sync.set_to_current_time()
        for family in results:
            self.health.updated(family)
        for table in ("filter", "nat"):
            written = sum(
                t.rules_written for r in results.values() for t in r.tables if t.table == table
            )
            m.rules_last.labels(table=table).set(written)
            owned = sum(
                len(t.jumps) + sum(len(c.rules) for c in t.chains)
                for rs in rulesets.values()
                for t in rs.tables
                if t.name == table
            )
            m.rules_total.labels(table=table).set(owned)
        for policy, count in (
            ("internal", sum(rs.no_local_internal for rs in rulesets.values())),
            ("external", sum(rs.no_local_external for rs in rulesets.values())),
        ):
            m.no_local_endpoints.labels(traffic_policy=policy).set(count)
        now = time.time()
        for trigger in snapshot.trigger_times:
            if trigger >= self.started_at:
                m.network_programming.observe(max(0.0, now - trigger))
        self._sync_service_health(snapshot)
        self.after_sync(snapshot)
        log.info(
            "sync_completed",
            full_sync=full,
            changed_services=len(snapshot.changed),
            chains_written=sum(r.chains_written for r in results.values()),
            chains_removed=sum(r.chains_removed for r in results.values()),
            seconds=round(seconds, 3),
        )

    def _sync_service_health(self, snapshot: Snapshot) -> None:
        if self.service_health is None:
            return
        ports = {
            spn.service: sp.health_check_node_port
            for spn, sp in snapshot.services.items()
            if sp.health_check_node_port
        }
        local = {
            key: len(
                {
                    ep.ip
                    for spn, eps in snapshot.endpoints.items()
                    if spn.service == key
                    for ep in eps
                    if ep.ready and ep.node_name == snapshot.node.name
                }
            )
            for key in ports
        }
        self.service_health.sync_services(ports)
        self.service_health.sync_endpoints(local)


def udp_changed(snapshot: Snapshot) -> bool:
    """Whether this sync may have left stale UDP flows: a UDP service changed, or a service
    went away (it may have been UDP)."""
    current = {spn.service for spn in snapshot.services}
    changed_udp = any(
        spn.service in snapshot.changed and sp.protocol is Protocol.UDP
        for spn, sp in snapshot.services.items()
    )
    return changed_udp or bool(snapshot.changed - current)
