"""The running agent freezes its heap after a full sync, so the collector's full passes no longer
walk the state and kept plans (seconds at 10,000 services, during which a change waits)."""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.state.ingest import replace_all, set_node, upsert
from kproxy.sync.loop import StateBox, SyncLoop
from kproxy.sync.modes import MODES
from tests.sync.test_sync_loop import endpoint_slice, service


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(predicate())


def test_the_heap_is_frozen_after_a_full_sync_and_a_partial_one_keeps_it() -> None:
    config = ProxyConfig(sync_period=30.0, min_sync_period=0)
    metrics, health = ProxyMetrics(), ProxyHealth(timeout=60.0)
    box = StateBox("node-a", health, metrics)
    fake = FakeDataplane()
    node = IptablesNode({4: fake}, write_sysctls=lambda sysctls: None)
    loop = SyncLoop(box, config, MODES["iptables"], node, metrics, health)
    box.apply(replace_all(Kind.SERVICE, [service("web", "10.96.0.5")]))
    box.apply(replace_all(Kind.ENDPOINT_SLICE, [endpoint_slice("web", ["10.0.0.1"])]))
    box.apply(set_node("node-a", []))
    for kind in (Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.NODE, Kind.SERVICE_CIDR):
        box.synced(kind)
    gc.unfreeze()
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    try:
        thread.start()
        assert wait_for(lambda: fake.commits > 0 and gc.get_freeze_count() > 0)
        frozen = gc.get_freeze_count()
        box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.2"])))
        assert wait_for(lambda: "10.0.0.2:8080" in fake.dump())
        assert gc.get_freeze_count() <= frozen  # a partial sync freezes nothing more
    finally:
        stop.set()
        box.changed.set()
        thread.join(5)
        gc.unfreeze()
