"""`kproxy status` and /statusz without root: the facts the sync loop reports, served read-only
on the metrics address and printed on one screen."""

from __future__ import annotations

import threading

import pytest
import scenarios

from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.health.metrics_server import serve_metrics
from kproxy.inspect.status_cmd import (
    AgentUnreachableError,
    fetch_status,
    render_status,
    status_url,
)
from kproxy.sync.loop import StateBox, SyncLoop
from kproxy.sync.modes import MODES
from kproxy.sync.status import SyncStatus, percentile
from kproxy.watch.supervisor import Supervisor


def test_percentiles_are_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99)) == (50.0, 99.0)
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0


@pytest.mark.parametrize(
    ("bind", "url"),
    [
        ("0.0.0.0:10249", "http://127.0.0.1:10249/statusz"),
        ("[::]:10249", "http://[::1]:10249/statusz"),
        ("10.0.0.5:9999", "http://10.0.0.5:9999/statusz"),
    ],
)
def test_status_url_asks_loopback_for_a_wildcard(bind: str, url: str) -> None:
    assert status_url(bind) == url


def _loop(status: SyncStatus) -> SyncLoop:
    scenario = scenarios.single_service()
    health, metrics = ProxyHealth(timeout=60.0), ProxyMetrics()
    box = StateBox(scenarios.NODE, health, metrics)
    box.state = scenario.state()
    box.state.node = scenario.node
    box.status = status
    node = IptablesNode({4: FakeDataplane()}, write_sysctls=lambda sysctls: None)
    return SyncLoop(box, scenario.config, MODES["iptables"], node, metrics, health, status=status)


def test_a_sync_and_a_skipped_object_are_served_and_printed() -> None:
    status = SyncStatus("iptables", (4,))
    loop = _loop(status)
    assert loop.sync() is not None
    status.skipped("Service", "Service default/broken", "spec.ports[0].port", "0 is not 1-65535")
    stop = threading.Event()
    source = Supervisor("files", lambda s: (s.current(), stop.wait()), stop).start()
    status.sources = [source]
    loop.health.statusz = lambda body: status.body(body, 60.0)
    server = serve_metrics(("127.0.0.1", 0), loop.health, loop.metrics)
    try:
        body = fetch_status(f"http://127.0.0.1:{server.address[1]}/statusz")
    finally:
        stop.set()
        server.close()
    assert body["mode"] == "iptables"
    assert body["families"] == ["IPv4"]
    assert body["lastSync"]["full"] is True and body["lastSync"]["changed"] is True
    assert body["syncs"]["count"] == 1 and body["syncs"]["p50Seconds"] is not None
    assert body["programmed"]["services"] == 1 and body["programmed"]["endpoints"] == 3
    assert body["programmed"]["rules"]["nat"] > 0
    assert [s["object"] for s in body["skipped"]] == ["Service default/broken"]
    assert body["sources"][0]["name"] == "files" and body["sources"][0]["problem"] is None
    text = render_status(body)
    assert "mode:        iptables (IPv4)" in text
    assert ", full, " in text
    assert "Service default/broken: spec.ports[0].port: 0 is not 1-65535" in text
    assert "files: current" in text


def test_a_skipped_service_programmed_later_is_no_longer_listed() -> None:
    status = SyncStatus("iptables", (4,))
    status.skipped("Service", "Service ns1/svc1", "spec.clusterIP", "not an IP")
    status.skipped("Service", "Service default/broken", "spec.clusterIP", "not an IP")
    assert _loop(status).sync() is not None  # programs ns1/svc1
    assert [s["object"] for s in status.body({}, 60.0)["skipped"]] == ["Service default/broken"]


def test_a_failed_sync_is_the_last_error() -> None:
    status = SyncStatus("iptables", (4,))
    status.failed("writing table nat failed: boom", full=False)
    text = render_status(status.body({"healthy": False}, 60.0))
    assert "last error:" in text and "boom" in text
    assert "last sync:   none yet" in text


def test_no_agent_says_what_to_do() -> None:
    with pytest.raises(AgentUnreachableError, match="is `kproxy run` running"):
        fetch_status("http://127.0.0.1:9/statusz", timeout=1.0)


def test_the_iptables_backend_is_served_and_printed() -> None:
    status = SyncStatus("iptables", (4,))
    status.iptables_backend = "nft"
    body = status.body({"healthy": True}, 60.0)
    assert body["iptablesBackend"] == "nft"
    assert "mode:        iptables (IPv4), nft backend" in render_status(body)
    assert "backend" not in render_status(SyncStatus("nftables", (4,)).body({}, 60.0))
