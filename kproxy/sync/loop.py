"""The agent's sync loop: coalesce changes, honour minSyncPeriod and syncPeriod, and run each sync
as named steps for whichever proxy mode the node runs: plan, apply, clean conntrack, report.

Sources (API watches or manifest files) report into a StateBox from their own threads; the loop
owns the dataplane (python-iptables is not thread-safe) and is the only writer of rules.
"""

from __future__ import annotations

import gc
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, countOf
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import structlog

from kproxy.dataplane.base import ApplyResult, ModeDataplane
from kproxy.dataplane.leftovers import LeftoverRemoval
from kproxy.errors import KproxyError
from kproxy.gcpause import gc_paused
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.health.service_health import ServiceHealthServers
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, ServicePort, ServicePortName
from kproxy.plan.conntrack import CleanupReport, UdpServing, plan_cleanup, with_cleaned
from kproxy.plan.node_plan import NodePlan, Planner
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import Mutation
from kproxy.sync.status import SyncStatus

if TYPE_CHECKING:
    from kproxy.sync.modes import ProxyMode

log = structlog.get_logger("kproxy.sync")
_READY = attrgetter("ready")

# A full sync (compare every chain with the kernel) runs at least this often, as upstream's.
FULL_SYNC_PERIOD = 3600.0
# How long one sync may spend starting conntrack requests (each ends soon after: the kernel
# filters); what is left waits for the next sync, which comes right after, so the loop is never
# held for long and health never fails for it.
CONNTRACK_SECONDS = 1.0


class ConntrackCleaning(Protocol):
    """Deletes stale UDP flows: per family, the keys to clean (with what may answer them now)
    and everything served now; starts no request after `deadline` (monotonic)."""

    def clean(
        self,
        work: Mapping[int, UdpServing],
        serving: Mapping[int, UdpServing],
        deadline: float | None = None,
    ) -> CleanupReport: ...


# After a failed sync the next waits minSyncPeriod (at least this), doubling with each failure in
# a row up to syncPeriod: a fault that persists is not retried in a tight loop.
RETRY_MIN_DELAY = 0.5


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
        self.status: SyncStatus | None = None  # /statusz lists the skipped objects

    def apply(self, mutation: Mutation) -> None:
        with self.lock:
            skipped = mutation.apply_to(self.state)
            if Kind.NODE in mutation.kinds:
                self._note_node(self.state.node)
        for kind, exc in skipped:
            self.metrics.objects_skipped.labels(kind=kind.value).inc()
            log.warning("object_skipped", object=exc.obj, field=exc.field, problem=exc.problem)
            if self.status is not None:
                self.status.skipped(kind.value, exc.obj, exc.field, exc.problem)
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
        """No rule is written before Services, EndpointSlices, this Node and the ServiceCIDRs
        have been listed once (as upstream waits for its informers): a plan made without the
        Node (its addresses, labels, pod CIDRs) would answer NodePorts on every local address,
        or ignore topology, and one without the ServiceCIDRs would lack the nftables mode's
        drop of unallocated ClusterIPs, until the next sync. A source tells a ServiceCIDR list
        the API server does not serve or RBAC forbids as listed (empty)."""
        with self.lock:
            return {Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.NODE, Kind.SERVICE_CIDR} <= self._synced


class SyncOutcome(NamedTuple):
    snapshot: Snapshot
    plan: NodePlan[Any]
    result: ApplyResult
    seconds: float


def listed_endpoints(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
) -> Iterator[Endpoint]:
    """The endpoints listed for the service ports, one port after another."""
    return chain.from_iterable(map(endpoints.get, services, repeat(())))


def endpoint_counts(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
) -> tuple[int, int, int]:
    """Over the service ports: the ready endpoints, their distinct addresses, and the
    endpoints listed but not ready."""
    listed = list(listed_endpoints(services, endpoints))
    ready = [ep for ep in listed if ep.ready]
    return len(ready), len({ep.ip for ep in ready}), len(listed) - len(ready)


@dataclass
class Snapshot:
    services: dict[ServicePortName, ServicePort]
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]]
    node: NodeInfo
    changed: set[NamespacedName]
    trigger_times: list[float]
    full: bool

    def endpoint_counts(self) -> tuple[int, int, int]:
        """Over the service ports: the ready endpoints, their distinct addresses, and the
        endpoints listed but not ready."""
        return endpoint_counts(self.services, self.endpoints)

    def ready_endpoints(self) -> int:
        """endpoint_counts()[0], at C speed (every sync reports it; 50,000 endpoints at 10,000
        services took 40 ms the other way)."""
        return countOf(map(_READY, listed_endpoints(self.services, self.endpoints)), True)


@dataclass
class SyncLoop:
    """Drives one proxy mode: its planner makes a NodePlan, its dataplane carries it out, and
    after its first commit the other modes' leftovers go (`leftovers`: sync/modes.py's
    other_modes_leftovers)."""

    box: StateBox
    config: ProxyConfig
    mode: ProxyMode
    dataplane: ModeDataplane
    metrics: ProxyMetrics
    health: ProxyHealth
    host_facts: Callable[[NodeInfo], NodeInfo] = lambda node: node
    clean_conntrack: ConntrackCleaning | None = None
    service_health: ServiceHealthServers | None = None
    status: SyncStatus | None = None  # what /statusz reports of the syncs
    leftovers: Sequence[LeftoverRemoval] = ()
    # True for a loop that syncs once and is then done (`sync --once` outside the userspace
    # mode): see _let_go.
    lets_go_after_plan: bool = False
    started_at: float = field(default_factory=time.time)
    _needs_full: bool = True
    _last_end: float = 0.0
    _last_full: float = 0.0
    # The last successful plan and the node it was made for: reused while nothing changed.
    _last_plan: tuple[NodeInfo, NodePlan[Any]] | None = None
    # Per family, each UDP service address whose flows were cleaned, with what could answer
    # then (kept across failed syncs): those that differ from a later plan are cleaned again,
    # those it drops have all their flows deleted.
    _cleaned: dict[int, UdpServing] = field(default_factory=dict)
    _failures_in_a_row: int = 0
    _services_seen: tuple[frozenset[ServicePortName], tuple[int, frozenset[str]]] | None = None
    planner: Planner[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.planner = self.mode.planner(self.config)
        self.metrics.for_mode(self.mode.needs.tables)  # its counters read 0 from the start

    def run(self, stop: threading.Event) -> None:
        """Sync until `stop` is set: after changes (no sooner than minSyncPeriod after the last
        sync), at least every syncPeriod, and after a failure with backoff. Health watches the
        thread that runs this: if it ever ends, /livez fails."""
        self.health.sync_thread = threading.current_thread()
        while not stop.is_set():
            self.box.changed.wait(timeout=self.config.sync_period)
            if stop.is_set():
                return
            if not self.box.ready:
                continue
            wait = self._last_end + self.retry_delay() - time.monotonic()
            if wait > 0 and stop.wait(wait):
                return
            self.box.changed.clear()
            outcome = self.sync()
            if outcome is not None and outcome.snapshot.full:
                freeze_heap()

    def retry_delay(self) -> float:
        """How long after the last sync the next may start."""
        if not self._failures_in_a_row:
            return self.config.min_sync_period
        first = max(self.config.min_sync_period, RETRY_MIN_DELAY)
        backoff: float = first * 2 ** min(self._failures_in_a_row - 1, 30)
        return max(first, min(self.config.sync_period, backoff))

    def sync(self) -> SyncOutcome | None:
        """One sync; a failure, whatever it raised, is logged, counted and kept for the retry
        (the changes stay owed): nothing a step raises ends the loop."""
        try:
            return self.sync_or_raise()
        except Exception:
            return None

    def sync_or_raise(self) -> SyncOutcome:
        """One sync: plan, apply, clean conntrack, report. `kproxy sync --once` is one call."""
        snapshot = self.take_snapshot()
        started = time.monotonic()
        try:
            with gc_paused(), self._reading_ahead(snapshot):
                plan = self.plan(snapshot)
                if self.lets_go_after_plan:
                    self._let_go(snapshot)
                result = self.apply(plan, snapshot.full)
            self.clean_stale_flows(plan)
            outcome = SyncOutcome(snapshot, plan, result, time.monotonic() - started)
            self.report(outcome)
        except Exception as exc:
            self._failed(snapshot, exc)
            raise
        self._last_end = time.monotonic()
        self._failures_in_a_row = 0
        return outcome

    def _let_go(self, snapshot: Snapshot) -> None:
        """Once planned, a sync that no other follows needs neither its inputs nor what the
        planner keeps for a next plan: the state, the snapshot's maps (which then hold
        nothing) and the planner's caches go before the apply, whose table blob is the
        process's peak (at 10,000 services x 5 endpoints, 34 MB of state and 10 MB of caches
        beside a 56 MB blob)."""
        self.planner = self.mode.planner(self.config)
        snapshot.services, snapshot.endpoints = {}, {}
        with self.box.lock:
            node, self.box.state = self.box.state.node, ClusterState()
            self.box.state.node = node

    def _failed(self, snapshot: Snapshot, exc: Exception) -> None:
        self._needs_full = True
        self._last_plan = None
        self._failures_in_a_row += 1
        self.metrics.for_mode(self.mode.needs.tables).sync_failed(snapshot.full)
        error = str(exc) if isinstance(exc, KproxyError) else repr(exc)
        where = {} if isinstance(exc, KproxyError) else {"where": raised_at(exc)}
        retry_in = round(self.retry_delay(), 3)
        log.error("sync_failed", error=error, full_sync=snapshot.full, retry_in=retry_in, **where)
        if self.status is not None:
            self.status.failed(error, snapshot.full)
        with self.box.lock:  # the changes were taken: keep them for the retry
            self.box.state.restore_changes(snapshot.changed)
        self.box.changed.set()
        self._last_end = time.monotonic()

    def _programmed_services(self, snapshot: Snapshot) -> tuple[int, frozenset[str]]:
        """How many Services a sync programs, and their names as status lists skipped objects:
        worked out again only when the service ports are not those of the last sync (an
        endpoint change leaves them as they were)."""
        last = self._services_seen
        if last is None or last[0] != snapshot.services.keys():
            services = {spn.service for spn in snapshot.services}
            names = frozenset(f"Service {key}" for key in services)
            last = self._services_seen = (frozenset(snapshot.services), (len(services), names))
        return last[1]

    def _reading_ahead(self, snapshot: Snapshot) -> AbstractContextManager[None]:
        """A partial sync with changes will write a change planned from what was committed
        last: let the dataplane read the kernel's proof while the plan is made."""
        if snapshot.changed and not snapshot.full:
            return self.dataplane.reading_ahead()
        return nullcontext()

    def take_snapshot(self) -> Snapshot:
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
        try:  # the node's addresses, over netlink: EMFILE and the like fail this sync only
            snapshot.node = self.host_facts(snapshot.node)
        except Exception as exc:
            self._failed(snapshot, exc)
            raise
        return snapshot

    def plan(self, snapshot: Snapshot) -> NodePlan[Any]:
        last = self._last_plan
        if last is not None and not snapshot.changed and last[0] == snapshot.node:
            return last[1]  # nothing changed: the same plan (the dataplane then skips it)
        families = self.dataplane.families
        return self.planner.plan(snapshot.services, snapshot.endpoints, snapshot.node, families)

    def apply(self, plan: NodePlan[Any], full: bool) -> ApplyResult:
        """The mode's apply; after its first commit, the other modes' leftovers."""
        result = self.dataplane.apply(plan, full)
        for removal in self.leftovers:
            removal.after_commit(result)
        return result

    def clean_stale_flows(
        self, plan: NodePlan[Any], seconds: float | None = CONNTRACK_SECONDS
    ) -> CleanupReport | None:
        """Delete the UDP flows `plan` made stale, spending about `seconds` (None: all of it);
        what is left is owed to the next sync, which is asked for at once."""
        if self.clean_conntrack is None:
            return None
        work = {
            family: plan_cleanup(self._cleaned.get(family, {}), plan.udp_serving.get(family, {}))
            for family in plan.families
        }
        work = {family: keys for family, keys in work.items() if keys}
        if not work:
            return None
        started = time.monotonic()
        deadline = None if seconds is None else started + seconds
        try:
            report = self.clean_conntrack.clean(work, plan.udp_serving, deadline)
        except Exception as exc:  # conntrack trouble must not stop rule syncing
            log.error("conntrack_cleanup_failed", error=str(exc))  # retried by the next sync
            return None
        for family, done in report.done.items():
            serving = plan.udp_serving.get(family, {})
            self._cleaned[family] = with_cleaned(self._cleaned.get(family, {}), serving, done)
        self.metrics.conntrack_duration.observe(time.monotonic() - started)
        self.metrics.conntrack_deleted.inc(report.deleted)
        if report.deleted or report.flushed:
            log.info(
                "conntrack_flows_deleted",
                count=report.deleted,
                flushed=report.flushed,
                read=report.read,
            )
        if report.left:
            log.info("conntrack_cleanup_deferred", addresses=report.left)
            self.box.changed.set()
        return report

    def report(self, outcome: SyncOutcome) -> None:
        snapshot, plan, result, seconds = outcome
        self._needs_full = False
        self._last_plan = (snapshot.node, plan)
        if snapshot.full:
            self._last_full = time.monotonic()
        # A partial sync turns full where a table changed behind kproxy's back and was read.
        full = snapshot.full or result.read_kernel
        m = self.metrics
        m.sync_duration.observe(seconds)
        (m.full_sync_duration if full else m.partial_sync_duration).observe(seconds)
        m.last_sync.set_to_current_time()
        for family in plan.families:
            self.health.updated(family)
        mode = m.for_mode(self.mode.needs.tables)
        mode.cleanups_failed(result.cleanup_failures)
        for table in self.mode.rule_tables:
            written = sum(t.rules_written for t in result.tables if t.table.split()[-1] == table)
            mode.rules_last.labels(table=table).set(written)
            mode.rules_total.labels(table=table).set(plan.stats.rules.get(table, 0))
        m.no_local_endpoints.labels(traffic_policy="internal").set(plan.stats.no_local_internal)
        m.no_local_endpoints.labels(traffic_policy="external").set(plan.stats.no_local_external)
        now = time.time()
        for trigger in snapshot.trigger_times:
            if trigger >= self.started_at:
                m.network_programming.observe(max(0.0, now - trigger))
        if self.service_health is not None:
            self.service_health.sync_addresses(plan.health_check_addresses)
            self.service_health.sync_services({h.service: h.port for h in plan.health_checks})
            self.service_health.sync_endpoints(
                {h.service: h.local_endpoints for h in plan.health_checks}
            )
        if self.status is not None:
            report_status(self.status, outcome, full, self._programmed_services(snapshot))
        log.info(
            "sync_completed",
            mode=plan.mode,
            full_sync=full,
            changed_services=len(snapshot.changed),
            chains_written=result.chains_written,
            chains_removed=result.chains_removed,
            seconds=round(seconds, 3),
        )


def freeze_heap() -> None:
    """After a full sync of the running agent: collect once, then keep what is alive (the state,
    the kept plans and tables: millions of objects at 10,000 services) out of the collector's
    later passes. Otherwise a full pass walks them all (1-2 s at 10,000 services, holding the
    interpreter lock) at whatever moment allocations trigger it, and a change arriving then
    waits it out. The frozen objects are freed by reference counting as usual; only a cycle
    among them waits for the next full sync (hourly, or after a failure), which thaws and
    collects them first."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def report_status(
    status: SyncStatus, outcome: SyncOutcome, full: bool, services: tuple[int, frozenset[str]]
) -> None:
    """The sync's facts for /statusz: what it changed, and what is programmed now (`services`:
    how many Services, and their names)."""
    snapshot, plan, result, seconds = outcome
    facts = {
        "full": full,
        "changedServices": len(snapshot.changed),
        "changed": result.changed,
        "chainsWritten": result.chains_written,
        "chainsRemoved": result.chains_removed,
        "rulesWritten": result.rules_written,
    }
    count, valid = services
    programmed = {
        "services": count,
        "servicePorts": len(snapshot.services),
        "endpoints": snapshot.ready_endpoints(),
        "rules": dict(plan.stats.rules),
    }
    status.synced(facts, programmed, seconds, valid)


def raised_at(exc: BaseException) -> str:
    """`file:line in function` where an exception kproxy did not foresee was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    last = frames[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"
