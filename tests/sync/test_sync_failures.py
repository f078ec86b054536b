"""Whatever a sync step raises is a failed sync: counted, logged, its changes kept, retried with
backoff; the loop's thread never ends because of it, and if that thread ends anyway /livez says so.
Against the faithful fake dataplane."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_sync_loop import agent, endpoint_slice, sample, service

from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.state.ingest import upsert
from kproxy.sync.loop import StateBox, SyncLoop

FAILURES = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"


def emfile() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


def failing(times: int, then: Callable[..., Any], exc: BaseException) -> Callable[..., Any]:
    """`then`, raising `exc` on the first `times` calls instead."""
    calls = [0]

    def call(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            raise exc
        return then(*args)

    return call


def web(box: StateBox, ip: str = "10.0.0.1") -> None:
    box.apply(upsert(Kind.SERVICE, service("web", "10.96.0.5")))
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", [ip])))


def test_an_oserror_from_apply_is_a_failed_sync_and_the_next_one_programs_it() -> None:
    box, loop, fake = agent()
    web(box)
    loop.dataplane.apply = failing(1, loop.dataplane.apply, emfile())  # type: ignore[method-assign]
    assert loop.sync() is None
    assert sample(loop, FAILURES) == 1
    assert "10.0.0.1:8080" not in fake.dump()
    assert loop.sync() is not None
    assert "10.0.0.1:8080" in fake.dump()


def test_an_oserror_reading_the_node_keeps_the_changes_for_the_retry() -> None:
    box, loop, fake = agent()
    web(box)
    loop.host_facts = failing(1, lambda node: node, emfile())
    assert loop.sync() is None
    assert sample(loop, FAILURES) == 1
    assert loop.sync() is not None
    assert "10.0.0.1:8080" in fake.dump()  # the change taken by the failed sync was kept


def test_an_error_while_reporting_is_a_failed_sync_too() -> None:
    box, loop, _ = agent()
    web(box)
    loop.report = failing(1, loop.report, RuntimeError("bug"))  # type: ignore[method-assign]
    assert loop.sync() is None
    assert sample(loop, FAILURES) == 1
    assert loop.sync() is not None


def test_failures_in_a_row_back_off_from_min_sync_period_to_sync_period() -> None:
    box, loop, _ = agent(ProxyConfig(min_sync_period=1.0, sync_period=30.0))
    web(box)
    apply = loop.dataplane.apply
    loop.dataplane.apply = failing(6, apply, emfile())  # type: ignore[method-assign]
    assert loop.retry_delay() == 1.0
    delays = []
    for _ in range(6):
        assert loop.sync() is None
        delays.append(loop.retry_delay())
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert loop.sync() is not None
    assert loop.retry_delay() == 1.0


def test_with_no_min_sync_period_a_failing_sync_is_still_not_retried_in_a_tight_loop() -> None:
    box, loop, _ = agent(ProxyConfig(min_sync_period=0.0, sync_period=2.0))
    web(box)
    loop.dataplane.apply = failing(3, loop.dataplane.apply, emfile())  # type: ignore[method-assign]
    delays = []
    for _ in range(3):
        loop.sync()
        delays.append(loop.retry_delay())
    assert delays == [0.5, 1.0, 2.0]


def run_in_thread(loop: SyncLoop) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), name="sync-loop", daemon=True)
    thread.start()
    return thread, stop


def synced(box: StateBox) -> None:
    for kind in (Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.NODE, Kind.SERVICE_CIDR):
        box.synced(kind)


def test_the_loop_keeps_running_through_oserrors_and_programs_the_change() -> None:
    box, loop, fake = agent(ProxyConfig(sync_period=0.05, min_sync_period=0.0))
    web(box)
    loop.dataplane.apply = failing(2, loop.dataplane.apply, emfile())  # type: ignore[method-assign]
    thread, stop = run_in_thread(loop)
    synced(box)
    deadline = time.monotonic() + 20  # a bound on failure, not a timing
    while "10.0.0.1:8080" not in fake.dump() and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = thread.is_alive()
    loop_health = loop.health.status()[1]["syncLoop"]
    stop.set()
    box.changed.set()
    thread.join(5)
    assert alive
    assert "10.0.0.1:8080" in fake.dump()
    assert sample(loop, FAILURES) == 2
    assert loop_health == {"healthy": True, "problems": []}


class Fatal(BaseException):
    """Stands for whatever could still end a thread (nothing a sync step raises does)."""


def test_livez_fails_once_the_sync_loop_thread_has_ended() -> None:
    box, loop, _ = agent(ProxyConfig(sync_period=0.05, min_sync_period=0.0))
    web(box)

    def host_facts(node: NodeInfo) -> NodeInfo:
        raise Fatal

    loop.host_facts = host_facts
    thread, _ = run_in_thread(loop)
    with pytest.MonkeyPatch.context() as patch:  # the thread's end is expected: no report
        patch.setattr(threading, "excepthook", lambda args: None)
        synced(box)
        thread.join(10)
    assert not thread.is_alive()
    healthy, body = loop.health.status()
    assert not healthy
    assert body["syncLoop"] == {
        "healthy": False,
        "problems": ["the sync loop's thread 'sync-loop' has ended; no rule is updated"],
    }
