"""The agent's loop against the faithful fake dataplane: readiness, failure and retry, health,
metrics, and node label changes."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.plan.conntrack import CleanupReport, UdpServing
from kproxy.state.ingest import remove, replace_all, set_node, upsert
from kproxy.sync.loop import StateBox, SyncLoop
from kproxy.sync.modes import MODES


def service(name: str, ip: str, protocol: str = "TCP") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": protocol}]},
    }


def endpoint_slice(
    name: str, ips: list[str], trigger: str | None = None, protocol: str = "TCP"
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"{name}-1",
        "namespace": "default",
        "labels": {"kubernetes.io/service-name": name},
    }
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
        "endpoints": [{"addresses": [ip]} for ip in ips],
    }


def agent(config: ProxyConfig | None = None) -> tuple[StateBox, SyncLoop, FakeDataplane]:
    config = config or ProxyConfig()
    metrics = ProxyMetrics()
    health = ProxyHealth(timeout=2 * config.sync_period)
    box = StateBox("node-a", health, metrics)
    fake = FakeDataplane()
    node = IptablesNode({4: fake}, write_sysctls=lambda sysctls: None)
    loop = SyncLoop(box, config, MODES["iptables"], node, metrics, health)
    return box, loop, fake


def sample(loop: SyncLoop, name: str, labels: dict[str, str] | None = None) -> float:
    value = loop.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_no_rules_before_services_slices_the_node_and_the_service_cidrs_are_listed() -> None:
    box, loop, fake = agent(ProxyConfig(sync_period=0.05, min_sync_period=0))
    box.apply(replace_all(Kind.SERVICE, [service("web", "10.96.0.5")]))
    box.synced(Kind.SERVICE)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        assert fake.commits == 0  # slices not listed yet
        box.apply(replace_all(Kind.ENDPOINT_SLICE, [endpoint_slice("web", ["10.0.0.1"])]))
        box.synced(Kind.ENDPOINT_SLICE)
        time.sleep(0.3)
        assert fake.commits == 0  # the Node not listed yet: its addresses decide the NodePorts
        box.synced(Kind.NODE)
        time.sleep(0.3)
        assert fake.commits == 0  # the ServiceCIDRs not listed: nftables drops in their ranges
        box.synced(Kind.SERVICE_CIDR)
        deadline = time.monotonic() + 5
        while fake.commits == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        box.changed.set()
        thread.join(5)
    assert "10.0.0.1:8080" in fake.dump()


def test_failed_apply_keeps_changes_and_next_sync_is_full() -> None:
    box, loop, fake = agent()
    box.apply(upsert(Kind.SERVICE, service("web", "10.96.0.5")))
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.1"])))
    assert loop.sync()
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.2"])))
    fake.fail_next_commit()
    assert not loop.sync()
    assert sample(loop, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 1
    assert sample(loop, "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total") == 1
    assert "10.0.0.1:8080" in fake.dump()  # the failed sync changed nothing
    assert loop.sync()
    assert "10.0.0.2:8080" in fake.dump() and "10.0.0.1:8080" not in fake.dump()
    assert sample(loop, "kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 2
    assert sample(loop, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 2


def test_health_turns_unhealthy_when_a_queued_change_waits_too_long() -> None:
    now = [1000.0]
    health = ProxyHealth(timeout=60, clock=lambda: now[0])
    assert health.status()[0]
    health.queued()
    now[0] += 59
    assert health.status()[0]
    now[0] += 2
    healthy, body = health.status()
    assert not healthy and body["healthy"] is False
    health.updated(4)
    assert health.status()[0]


def test_programming_latency_observed_for_changes_after_start() -> None:
    box, loop, _ = agent()
    loop.started_at = time.time() - 10
    just_now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 2))
    long_ago = "2020-01-01T00:00:00Z"
    box.apply(upsert(Kind.SERVICE, service("web", "10.96.0.5")))
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.1"], just_now)))
    box.apply(upsert(Kind.SERVICE, service("old", "10.96.0.6")))
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("old", ["10.0.0.9"], long_ago)))
    assert loop.sync()
    name = "kubeproxy_network_programming_duration_seconds"
    assert sample(loop, f"{name}_count") == 1  # the change from before start is not counted
    assert 1.0 <= sample(loop, f"{name}_sum") < 60


def test_node_label_change_forces_a_full_sync_and_draining_node_is_not_eligible() -> None:
    box, loop, _ = agent()
    node = {"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}}}
    box.apply(set_node("node-a", [node]))
    assert loop.sync()  # first sync: full
    assert loop.sync()  # nothing changed: partial
    node["metadata"]["labels"] = {"topology.kubernetes.io/zone": "z2"}
    box.apply(set_node("node-a", [node]))
    assert loop.sync()
    assert sample(loop, "kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 2
    assert sample(loop, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") == 1
    node["spec"] = {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}
    box.apply(set_node("node-a", [node]))
    assert box.health.node_eligible is False


def test_invalid_object_is_counted_and_the_rest_applied() -> None:
    box, loop, fake = agent()
    bad = service("bad", "10.96.0.300")
    box.apply(replace_all(Kind.SERVICE, [bad, service("good", "10.96.0.7")]))
    assert sample(loop, "kproxy_invalid_objects_skipped_total", {"kind": "Service"}) == 1
    assert loop.sync()
    assert "default/good:p has no endpoints" in fake.dump()


class RecordingCleaner:
    """Records the work each cleanup was given; cleans at most `per_call` keys a call (the
    rest is left, as when the time allowed runs out), or fails when told to."""

    def __init__(self, per_call: int = 1000) -> None:
        self.calls: list[dict[int, Any]] = []
        self.per_call = per_call
        self.fail = False

    def clean(
        self,
        work: Mapping[int, UdpServing],
        serving: Mapping[int, UdpServing],
        deadline: float | None = None,
    ) -> CleanupReport:
        self.calls.append({family: dict(keys) for family, keys in work.items()})
        if self.fail:
            raise OSError("netlink said no")
        report = CleanupReport()
        budget = self.per_call if deadline is not None else 10**6
        for family, keys in work.items():
            done = sorted(keys)[:budget]
            report.done[family] = done
            report.left += len(keys) - len(done)
            budget -= len(done)
        return report


def test_only_udp_addresses_whose_endpoints_changed_are_cleaned() -> None:
    box, loop, _ = agent()
    cleaner = loop.clean_conntrack = RecordingCleaner()
    box.apply(upsert(Kind.SERVICE, service("dns", "10.96.0.10", "UDP")))
    box.apply(upsert(Kind.SERVICE, service("web", "10.96.0.5")))
    assert loop.sync()
    assert cleaner.calls == [{4: {("10.96.0.10", 80): frozenset()}}]  # nothing may answer yet
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.1"])))
    assert loop.sync()
    assert len(cleaner.calls) == 1  # a TCP change leaves conntrack alone
    box.apply(upsert(Kind.SERVICE, service("dns2", "10.96.0.11", "UDP")))
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("dns", ["10.0.0.9"], protocol="UDP")))
    assert loop.sync()
    assert cleaner.calls[-1] == {  # not the unchanged ones: only what changed is asked for
        4: {("10.96.0.10", 80): frozenset({"10.0.0.9"}), ("10.96.0.11", 80): frozenset()}
    }
    assert loop.sync()
    assert len(cleaner.calls) == 2  # nothing changed: nothing asked
    box.apply(remove(Kind.SERVICE, service("dns", "10.96.0.10", "UDP")))
    assert loop.sync()
    # The removed service's address, with nothing allowed to answer: all its flows go.
    assert cleaner.calls[-1] == {4: {("10.96.0.10", 80): frozenset()}}


def test_a_cleanup_out_of_time_leaves_the_rest_to_the_next_sync_at_once() -> None:
    box, loop, _ = agent()
    cleaner = loop.clean_conntrack = RecordingCleaner(per_call=1)
    for i in range(3):
        box.apply(upsert(Kind.SERVICE, service(f"dns{i}", f"10.96.0.{10 + i}", "UDP")))
    assert loop.sync()
    assert box.changed.is_set()  # the next sync is owed now, not a syncPeriod later
    box.changed.clear()
    assert loop.sync()
    assert box.changed.is_set()
    box.changed.clear()
    assert loop.sync()
    assert [sorted(call[4]) for call in cleaner.calls] == [
        [("10.96.0.10", 80), ("10.96.0.11", 80), ("10.96.0.12", 80)],
        [("10.96.0.11", 80), ("10.96.0.12", 80)],
        [("10.96.0.12", 80)],
    ]
    assert not box.changed.is_set()
    assert loop.sync()
    assert len(cleaner.calls) == 3


def test_a_failed_cleanup_is_retried_by_the_next_sync() -> None:
    box, loop, _ = agent()
    cleaner = loop.clean_conntrack = RecordingCleaner()
    box.apply(upsert(Kind.SERVICE, service("dns", "10.96.0.10", "UDP")))
    cleaner.fail = True
    assert loop.sync()  # the rules were synced all the same
    cleaner.fail = False
    assert loop.sync()
    assert cleaner.calls == [{4: {("10.96.0.10", 80): frozenset()}}] * 2


def test_a_sync_with_nothing_changed_reuses_the_last_plan_and_commits_nothing() -> None:
    box, loop, fake = agent()
    box.apply(upsert(Kind.SERVICE, service("web", "10.96.0.5")))
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.1"])))
    assert loop.sync()
    first = loop.plan(loop.take_snapshot())
    commits = fake.commits
    assert loop.sync()
    assert fake.commits == commits
    assert loop.plan(loop.take_snapshot()).kernel[4] is first.kernel[4]
    # A change plans again.
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.2"])))
    assert loop.sync()
    assert fake.commits > commits and "10.0.0.2:8080" in fake.dump()


def test_a_removed_udp_service_loses_its_flows_even_after_a_failed_sync() -> None:
    box, loop, fake = agent()
    cleaner = loop.clean_conntrack = RecordingCleaner()
    box.apply(upsert(Kind.SERVICE, service("dns", "10.96.0.10", "UDP")))
    assert loop.sync()
    box.apply(remove(Kind.SERVICE, service("dns", "10.96.0.10", "UDP")))
    fake.fail_next_commit()
    assert loop.sync() is None  # the failed sync forgets its plan, not what was served
    assert loop.sync()
    assert cleaner.calls[-1] == {4: {("10.96.0.10", 80): frozenset()}}
