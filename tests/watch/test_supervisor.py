"""Supervised source threads and source liveness: a body that keeps raising keeps being retried
(counted each time, logged once per run of the same failure, naming the object), only `stop`
ends the thread, and a source that is not current for longer than the health timeout (or whose
thread ended) turns /livez and /healthz to 503."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from structlog.testing import capture_logs

from kproxy.health.healthz import ProxyHealth, serve_health
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.kinds import Kind
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import Mutation, replace_all, upsert
from kproxy.watch.api import Reflector, Resource
from kproxy.watch.supervisor import Backoff, Supervisor, source_problems

FAST = Backoff(initial=0.001, cap=0.01)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


def test_a_body_that_keeps_raising_is_retried_until_stop_ends_the_thread() -> None:
    stop = threading.Event()
    calls: list[float] = []

    def body(sup: Supervisor) -> None:
        calls.append(time.monotonic())
        sup.handling = "Service default/web"
        raise RuntimeError("boom")

    with capture_logs() as logs:
        sup = Supervisor("test", body, stop, backoff=Backoff(initial=0.001, cap=0.01)).start()
        assert wait_for(lambda: len(calls) >= 5)
        assert sup._thread is not None and sup._thread.is_alive()
        stop.set()
        sup._thread.join(timeout=5)
    assert not sup._thread.is_alive()
    failed = [e for e in logs if e["event"] == "source_failed"]
    assert len(failed) == 1  # a run of the same failure is logged once, and counted each time
    assert failed[0]["source"] == "test" and failed[0]["object"] == "Service default/web"
    assert failed[0]["error"] == "RuntimeError: boom" and failed[0]["log_level"] == "error"
    assert sup.failures >= 5 and sup.handling is None


def test_transient_errors_are_warnings_under_the_sources_own_event() -> None:
    stop = threading.Event()

    def body(sup: Supervisor) -> None:
        stop.set()
        raise OSError("connection refused")

    with capture_logs() as logs:
        Supervisor("w", body, stop, transient=(OSError,), transient_event="watch_failed").run()
    assert [(e["event"], e["log_level"]) for e in logs] == [("watch_failed", "warning")]


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(initial=1.0, cap=4.0)
    delays = [backoff.next() for _ in range(5)]
    assert all(0.8 <= d / c <= 1.2 for d, c in zip(delays, [1, 2, 4, 4, 4], strict=True))
    backoff.reset()
    assert 0.8 <= backoff.next() <= 1.2


def test_a_source_not_current_for_longer_than_the_timeout_is_a_problem() -> None:
    now = [100.0]
    sup = Supervisor("files", lambda s: None, threading.Event(), clock=lambda: now[0])
    assert sup.problem(timeout=60) is None
    now[0] += 61
    assert sup.problem(timeout=60) == "source files: not current for 61 s"
    sup.last_error = "ManifestError: gone"
    assert "(ManifestError: gone)" in str(sup.problem(timeout=60))
    sup.current()
    assert sup.problem(timeout=60) is None
    idle = Supervisor("watch", lambda s: None, threading.Event(), min_silence=360, clock=lambda: 0)
    idle._last_current = -300.0  # an idle watch: allowed its own, longer silence
    assert idle.problem(timeout=60) is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_thread_that_ended_is_a_problem() -> None:
    def body(sup: Supervisor) -> None:
        raise SystemExit  # not an Exception: nothing should ever do this, but if it did

    sup = Supervisor("files", body, threading.Event()).start()
    assert sup._thread is not None
    sup._thread.join(timeout=5)
    assert sup.problem(timeout=60) == "source files: thread ended"


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_livez_and_healthz_fail_with_the_reason_while_a_source_is_stale() -> None:
    now = [1000.0]
    health = ProxyHealth(timeout=60, clock=lambda: now[0])
    sup = Supervisor("files", lambda s: None, threading.Event(), clock=lambda: now[0])
    health.source_problems = source_problems([sup], health.timeout)
    server = serve_health(("127.0.0.1", 0), health, ProxyMetrics())
    port = server.address[1]
    try:
        assert _get(port, "/livez")[0] == 200
        now[0] += 61
        for path in ("/livez", "/healthz"):
            status, body = _get(port, path)
            assert status == 503
            assert body["healthy"] is False
            assert body["sources"] == {
                "healthy": False,
                "problems": ["source files: not current for 61 s"],
            }
        sup.current()
        assert _get(port, "/livez")[0] == 200
    finally:
        server.close()


class FailingSink:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.state = ClusterState()

    def apply(self, mutation: Mutation) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("sink exploded")
        mutation(self.state)

    def synced(self, kind: Kind) -> None:
        pass


def test_a_reflector_whose_sink_raises_is_retried_and_names_what_it_handled() -> None:
    stop = threading.Event()
    service = {
        "metadata": {"name": "web"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
    }

    def list_fn(**kwargs: Any) -> Any:
        if kwargs.get("watch"):
            stop.wait(5)
            raise ApiException(status=500, reason="stopping")
        body = {"metadata": {"resourceVersion": "1"}, "items": [service]}
        return type("Response", (), {"data": json.dumps(body)})()

    sink = FailingSink(failures=2)
    resource = Resource(
        Kind.SERVICE, list_fn, {}, lambda items: replace_all(Kind.SERVICE, items), upsert
    )
    with capture_logs() as logs:
        sup = Supervisor(
            "watch-Service",
            Reflector(resource, sink).run,
            stop,
            backoff=FAST,
            transient=(ApiException,),
            transient_event="watch_failed",
        )
        sup.start()
        assert wait_for(lambda: sink.state.service_keys())
        stop.set()
        assert sup._thread is not None
        sup._thread.join(timeout=10)
    failed = [e for e in logs if e["event"] == "source_failed"]
    assert len(failed) == 1 and failed[0]["object"] == "Service list"  # the same twice
    assert sup.failures >= 2  # and the ApiException that ends the watch at stop
    assert sup.problem(timeout=60) is None
