"""Out of descriptors (EMFILE) in the sources and in the userspace mode's hand-over: each degrades
only its own step, which is retried, counted, and logged once per run of the same failure; the
source recovers when descriptors are free again, and nothing ends a thread or the agent."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import yaml
from structlog.testing import capture_logs
from urllib3.exceptions import NewConnectionError

import kproxy.sync.handover as handover_module
import kproxy.watch.inotify as inotify_module
from kproxy.dataplane.base import ApplyResult
from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.userspace.node import UserspaceNode
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.plan.node_plan import NodePlan
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import Mutation, replace_all, upsert
from kproxy.sync.handover import hand_over_to_iptables
from kproxy.sync.loop import Snapshot, SyncLoop
from kproxy.watch.api import Reflector, Resource
from kproxy.watch.files import ManifestSource
from kproxy.watch.supervisor import Backoff, Supervisor

T = TypeVar("T")
FAST = Backoff(initial=0.001, cap=0.01)
FAILURES = 5


def emfile() -> OSError:
    return OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def wait_for(predicate: Callable[[], T], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


# -- supervised sources ----------------------------------------------------------------------


def test_a_run_of_emfile_is_logged_once_counted_and_the_recovery_logged() -> None:
    stop = threading.Event()
    calls: list[int] = []

    def body(sup: Supervisor) -> None:
        calls.append(1)
        if len(calls) <= FAILURES:
            raise emfile()
        sup.current()
        stop.wait()

    with capture_logs() as logs:
        sup = Supervisor(
            "watch-Service", body, stop, backoff=FAST, transient=(OSError,), transient_event="w"
        ).start()
        assert wait_for(lambda: len(calls) > FAILURES)
        assert sup._thread is not None and sup._thread.is_alive()
        stop.set()
        sup._thread.join(timeout=5)
    assert sup.failures == FAILURES
    assert [e["event"] for e in logs] == ["w", "source_recovered"]
    assert logs[0]["error"] == "OSError: [Errno 24] Too many open files"
    assert logs[1]["repeated"] == FAILURES - 1
    assert sup.last_error == "" and sup.problem(timeout=60) is None


def test_a_different_failure_in_the_run_is_logged_again() -> None:
    stop = threading.Event()
    errors: list[Exception] = [emfile(), emfile(), ConnectionRefusedError("refused"), emfile()]

    def body(sup: Supervisor) -> None:
        if not errors:
            stop.set()
            return
        raise errors.pop(0)

    with capture_logs() as logs:
        Supervisor("s", body, stop, backoff=FAST, transient=(OSError,)).run()
    assert [e["error"].split(":")[0] for e in logs] == [
        "OSError",
        "ConnectionRefusedError",
        "OSError",
    ]


def test_an_exception_whose_message_fails_does_not_end_the_thread() -> None:
    stop = threading.Event()

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no message")

    calls: list[int] = []

    def body(sup: Supervisor) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise Unprintable()
        stop.set()

    with capture_logs() as logs:
        Supervisor("s", body, stop, backoff=FAST).run()
    assert len(calls) == 2 and logs[0]["error"] == "Unprintable: (no message)"


class StateSink:
    def __init__(self) -> None:
        self.state = ClusterState()

    def apply(self, mutation: Mutation) -> None:
        mutation(self.state)

    def synced(self, kind: Kind) -> None:
        pass


def test_a_reflector_whose_connections_fail_with_emfile_lists_once_descriptors_are_free() -> None:
    """The client reports EMFILE as urllib3's NewConnectionError, naming a new connection
    object (a new address in the message) on every attempt: still one run, one warning."""
    stop = threading.Event()
    attempts: list[int] = []
    service = {
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
    }

    def list_fn(**kwargs: Any) -> Any:
        if kwargs.get("watch"):
            stop.wait(5)
            return iter(())
        attempts.append(1)
        if len(attempts) <= FAILURES:
            raise NewConnectionError(
                object(), "Failed to establish a new connection: [Errno 24] Too many open files"
            )
        body = {"metadata": {"resourceVersion": "1"}, "items": [service]}
        return type("Response", (), {"data": json.dumps(body)})()

    sink = StateSink()
    resource = Resource(
        Kind.SERVICE, list_fn, {}, lambda items: replace_all(Kind.SERVICE, items), upsert
    )
    with capture_logs() as logs:
        sup = Supervisor(
            "watch-Service",
            Reflector(resource, sink).run,  # type: ignore[arg-type]
            stop,
            backoff=FAST,
            transient=(OSError, NewConnectionError),
            transient_event="watch_failed",
        ).start()
        assert wait_for(lambda: sink.state.service_keys())
        failures, events = sup.failures, [e["event"] for e in logs]
        stop.set()
        assert sup._thread is not None
        sup._thread.join(timeout=10)
    assert failures == FAILURES
    assert events == ["watch_failed", "source_recovered"]


def test_source_failures_are_exported() -> None:
    metrics = ProxyMetrics()
    metrics.watch_sources(lambda: {"watch-Service": 3})
    value = metrics.registry.get_sample_value(
        "kproxy_source_failures_total", {"source": "watch-Service"}
    )
    assert value == 3


# -- the file source's inotify ---------------------------------------------------------------


class ShortLibc:
    """libc whose first inotify_init1 fails as the kernel does with no descriptor free."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.refusals = 1

    def inotify_init1(self, flags: int) -> int:
        if self.refusals:
            self.refusals -= 1
            ctypes.set_errno(errno.EMFILE)
            return -1
        return int(self.real.inotify_init1(flags))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_inotify_short_of_descriptors_is_polled_then_watched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = inotify_module._libc()
    libc = ShortLibc(real)
    monkeypatch.setattr(inotify_module, "_libc", lambda: libc)
    (tmp_path / "web.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
            }
        )
    )
    stop = threading.Event()
    sink = StateSink()
    source = ManifestSource(str(tmp_path), "node-a", poll_seconds=0.02, full_scan_seconds=0.2)
    try:
        with capture_logs() as logs:
            source.start(sink, stop)  # type: ignore[arg-type]

            def modes() -> list[str]:
                return [e["mode"] for e in logs if e["event"] == "manifests_followed"]

            assert wait_for(lambda: modes() == ["poll", "inotify"]), modes()
        assert sink.state.service_keys()
        assert libc.refusals == 0
    finally:
        stop.set()


def test_a_shortage_is_an_inotify_error_that_may_pass() -> None:
    assert inotify_module.InotifyError("x", errno.EMFILE).shortage
    assert not inotify_module.InotifyError("no inotify_init1").shortage


# -- the userspace mode's hand-over at stop ---------------------------------------------------


class FlakyNode(UserspaceNode):
    """Its hand-over fails with EMFILE `failures` times, then works (over the fake tables)."""

    failures = 0

    def hand_over(self, plan: NodePlan[Any]) -> ApplyResult:
        if self.failures:
            self.failures -= 1
            raise emfile()
        return super().hand_over(plan)


class StoppingLoop:
    """What the hand-over asks of the sync loop as the agent stops."""

    def __init__(self, node: UserspaceNode) -> None:
        self.dataplane = node
        self.config = ProxyConfig()
        self.metrics = ProxyMetrics()

    def take_snapshot(self) -> Snapshot:
        node = NodeInfo("node-a", local_addresses=("10.0.0.5",), primary_ips=("10.0.0.5",))
        return Snapshot({}, {}, node, set(), [], True)

    def clean_stale_flows(self, plan: Any, seconds: float | None = None) -> None:
        return None


@pytest.fixture
def flaky_node(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(handover_module, "RETRY_WAITS", (0.0, 0.0), raising=False)
    relay = Relay()
    relay.start()
    try:
        yield FlakyNode({4: FakeDataplane()}, {4: relay}, write_sysctls=lambda _: None)
    finally:
        relay.stop()


def _failures(loop: StoppingLoop) -> float | None:
    return loop.metrics.registry.get_sample_value("kproxy_userspace_handover_failures_total")


def test_a_hand_over_that_fails_with_emfile_is_retried(flaky_node: FlakyNode) -> None:
    flaky_node.failures = 1
    loop = StoppingLoop(flaky_node)
    with capture_logs() as logs:
        hand_over_to_iptables(cast(SyncLoop, loop), drain_seconds=0.0)
    assert [e["event"] for e in logs] == ["portals_handed_over"]
    assert logs[0]["failed_attempts"] == 1
    assert _failures(loop) == 1


def test_a_hand_over_that_keeps_failing_never_raises_and_is_logged_once(
    flaky_node: FlakyNode,
) -> None:
    flaky_node.failures = 100
    loop = StoppingLoop(flaky_node)
    with capture_logs() as logs:
        hand_over_to_iptables(cast(SyncLoop, loop), drain_seconds=0.0)
    assert [(e["event"], e["attempts"]) for e in logs] == [("handover_failed", 3)]
    assert logs[0]["portals"] == "left in place"
    assert _failures(loop) == 3
