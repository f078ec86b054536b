"""The long-running agent (`kproxy run`) in a node namespace, fed by the test API server through
the real `kubernetes` client (or by manifest files), with real traffic from pod namespaces.

See integration/agent_harness.py for how the pieces are wired; the figures printed here (change
latency, drain time) are shown with `pytest -s`. Every test runs in both proxy modes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from integration.agent_harness import (
    METRICS_PORT,
    OTHER_NODE,
    AgentNode,
    agent_node,
    answered_by,
    log_time,
    rfc3339,
    slice_object,
    summarize,
    wait_for_nat,
    wait_until,
    wall_time,
)
from integration.conftest import both_modes
from integration.manifests import service_manifest

VIP = "10.96.0.10"
PORT = 80
TARGET = 8080
DNS_VIP = "10.96.0.53"
CLIENT_PORT = 40053  # the UDP client's fixed source port: one conntrack flow for all its datagrams
CHANGE_BOUND = 10.0  # generous upper bound on API change -> traffic (syncPeriod is 2 s)

pytestmark = both_modes


@pytest.fixture
def node(tmp_path: Path, proxy_mode: str) -> Iterator[AgentNode]:
    with agent_node("agent", tmp_path, mode=proxy_mode) as built:
        yield built


@pytest.fixture
def bare_node(tmp_path: Path, proxy_mode: str) -> Iterator[AgentNode]:
    """A node without the API server, for the file source."""
    with agent_node("files", tmp_path, with_api=False, mode=proxy_mode) as built:
        yield built


def test_api_changes_reach_traffic_and_removed_endpoint_drains(node: AgentNode) -> None:
    a = node.backend("web-a", "192.168.1.10", TARGET)
    b = node.backend("web-b", "192.168.2.10", TARGET)
    client = node.client("client", "192.168.9.9")
    node.start_agent()
    # Two clients: a fast one (short timeouts, so a connection tried just before the rules
    # existed does not hide the first one after) times the change; the other, with patient
    # timeouts, must see no failure once the service works.
    fast = node.poller(client, VIP, PORT, interval=0.01, timeout=0.05)
    poller = node.poller(client, VIP, PORT, interval=0.02, timeout=1.0)
    time.sleep(0.3)
    assert not any(x.ok for x in fast.attempts()), "the VIP answered before the Service existed"

    created = time.monotonic()
    node.api.create("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.create("EndpointSlice", slice_object("web", [a.ip, b.ip], TARGET))
    first = fast.first(lambda x: x.ok, created, timeout=CHANGE_BOUND + 5)
    assert first is not None, summarize(fast.attempts(created))
    fast.stop()
    latency = first.ended - created
    print(f"\nAPI create -> first connection answered by an endpoint: {latency * 1000:.0f} ms")
    assert latency < CHANGE_BOUND
    working = poller.first(lambda x: x.ok, created, timeout=5)
    assert working is not None, summarize(poller.attempts(created))
    for name in ("web-a", "web-b"):
        assert poller.first(answered_by(name), created, timeout=10), name

    removed = time.monotonic()
    node.api.update("EndpointSlice", slice_object("web", [a.ip], TARGET))
    settled = poller.settled_on({"web-a"}, removed, streak=50, timeout=CHANGE_BOUND + 5)
    attempts = poller.stop()
    assert settled - removed < CHANGE_BOUND, summarize(poller.attempts(removed))
    drained = max(0.0, max(x.ended for x in attempts if x.outcome == "web-b") - removed)
    print(f"endpoint removed -> no connection reached it {drained * 1000:.0f} ms after the update")
    # Once the rules changed, the removed endpoint gets nothing (it is still up and listening).
    assert node.probe(client, VIP, PORT, 100) == {"web-a": 100}
    # Failures can only be the attempts before the Service worked.
    assert all(x.ok for x in attempts if x.started >= working.ended), summarize(attempts)


def test_udp_flow_moves_to_new_endpoint_after_conntrack_cleanup(node: AgentNode) -> None:
    old = node.backend("dns-old", "192.168.1.53", 53, "udp")
    new = node.backend("dns-new", "192.168.2.53", 53, "udp")
    client = node.client("client", "192.168.9.9")
    agent = node.start_agent()
    node.api.create("Service", service_manifest("dns", DNS_VIP, 53, 53, "UDP"))
    node.api.create("EndpointSlice", slice_object("dns", [old.ip], 53, "UDP"))
    # Start the flow only once the rules exist, so it is DNATed to the old pod from its start.
    assert wait_for_nat(node, node.dnat_to(old.ip, 53))
    flow_start = time.monotonic()
    poller = node.poller(
        client, DNS_VIP, 53, proto="udp", interval=0.05, timeout=0.5, source_port=CLIENT_PORT
    )
    assert poller.settled_on({"dns-old"}, flow_start, streak=20, timeout=10) < float("inf")

    def flow() -> list[dict[str, str]]:
        return [
            e
            for e in node.conntrack_udp()
            if e["orig_dst"] == DNS_VIP and e["orig_sport"] == str(CLIENT_PORT)
        ]

    # One flow, pinned to the old pod: every datagram refreshes it, so without a cleanup the
    # client would keep talking to the old pod (which is still up) until it stopped sending.
    before = flow()
    assert [e["reply_src"] for e in before] == [old.ip], before

    changed = time.monotonic()
    node.api.update("EndpointSlice", slice_object("dns", [new.ip], 53, "UDP"))
    first_new = poller.first(answered_by("dns-new"), changed, CHANGE_BOUND + 5)
    assert first_new is not None, summarize(poller.attempts(changed))
    print(
        f"\nUDP endpoint replaced -> same flow answered by the new pod: "
        f"{(first_new.ended - changed) * 1000:.0f} ms"
    )
    assert first_new.ended - changed < CHANGE_BOUND

    # Within one sync: the first sync after the change programmed the new pod and deleted the
    # stale flow, and the next datagram (50 ms later) already went to the new pod, long before
    # the following periodic sync (2 s).
    def applying_sync() -> dict[str, object] | None:
        return next(
            (
                e
                for e in agent.syncs()
                if log_time(e) >= wall_time(changed) and e["changed_services"]
            ),
            None,
        )

    sync = wait_until(applying_sync, timeout=5)
    assert sync is not None, agent.log_tail()
    assert wall_time(first_new.started) <= log_time(sync) + 1.0, (sync, first_new)
    deleted = agent.events("conntrack_flows_deleted")
    assert deleted and deleted[-1]["count"] >= 1, agent.log_tail()

    time.sleep(0.5)
    after = flow()
    assert not [e for e in after if e["reply_src"] == old.ip], after
    assert [e["reply_src"] for e in after] == [new.ip], after
    attempts = poller.stop()
    later = [x.outcome for x in attempts if x.started > first_new.ended]
    assert later and set(later) == {"dns-new"}, summarize(attempts)


def _families(text: str) -> dict[str, list[Sample]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    matching = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(matching) == 1, (name, labels, samples)
    return matching[0]


def test_metrics_report_syncs_and_network_programming_latency(node: AgentNode) -> None:
    a = node.backend("web-a", "192.168.1.10", TARGET)
    started = time.time()
    node.api.create("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.create("EndpointSlice", slice_object("web", [a.ip], TARGET))
    # internalTrafficPolicy Local with its only endpoint on another node: no local endpoints.
    node.api.create(
        "Service",
        service_manifest("local", "10.96.0.11", PORT, TARGET, internal_policy="Local"),
    )
    node.api.create(
        "EndpointSlice", slice_object("local", ["192.168.77.7"], TARGET, node_name=OTHER_NODE)
    )
    node.start_agent()

    b = node.backend("web-b", "192.168.2.10", TARGET)
    changed_at = time.time()
    node.api.update(
        "EndpointSlice", slice_object("web", [b.ip], TARGET, trigger_time=rfc3339(changed_at))
    )
    assert wait_for_nat(node, node.dnat_to(b.ip, TARGET))

    def second_sync_reported() -> dict[str, list[Sample]] | None:
        # The rules are in the kernel a little before the sync that wrote them is reported.
        status, text = node.http_get(METRICS_PORT, "/metrics")
        assert status == 200
        found = _families(text)
        syncs = found["kubeproxy_sync_proxy_rules_duration_seconds"]
        count = _value(syncs, "kubeproxy_sync_proxy_rules_duration_seconds_count")
        return found if count >= 2 else None

    reported = wait_until(second_sync_reported, timeout=15)
    assert reported, "the second sync was never reported"
    families = reported
    syncs = families["kubeproxy_sync_proxy_rules_duration_seconds"]
    assert _value(syncs, "kubeproxy_sync_proxy_rules_duration_seconds_sum") > 0
    last = _value(
        families["kubeproxy_sync_proxy_rules_last_timestamp_seconds"],
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    )
    assert started <= last <= time.time() + 1
    programming = families["kubeproxy_network_programming_duration_seconds"]
    assert _value(programming, "kubeproxy_network_programming_duration_seconds_count") == 1
    latency = _value(programming, "kubeproxy_network_programming_duration_seconds_sum")
    print(f"\nnetwork programming latency reported: {latency * 1000:.0f} ms")
    assert 0 <= latency <= time.time() - changed_at
    # Each mode's own failure counters and rules gauges, under upstream's names, and no other's.
    if node.mode == "nftables":
        counters = ("nftables_sync_failures", "nftables_cleanup_failures")
        rules, table, absent = "kproxy_sync_proxy_rules_nftables_total", "kube-proxy", "iptables"
    else:
        counters = ("iptables_restore_failures", "iptables_partial_restore_failures")
        rules, table, absent = "kubeproxy_sync_proxy_rules_iptables_total", "nat", "nftables"
    for counter in counters:
        name = f"kubeproxy_sync_proxy_rules_{counter}"
        assert _value(families[name], f"{name}_total") == 0
    assert _value(families[rules], rules, table=table) > 0
    assert not [name for name in families if f"_{absent}_" in name], sorted(families)
    no_local = families["kubeproxy_sync_proxy_rules_no_local_endpoints_total"]
    name = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    assert _value(no_local, name, traffic_policy="internal") == 1, no_local
    assert _value(no_local, name, traffic_policy="external") == 0, no_local


def test_sigterm_exits_zero_and_leaves_rules_working(node: AgentNode) -> None:
    a = node.backend("web-a", "192.168.1.10", TARGET)
    client = node.client("client", "192.168.9.9")
    node.api.create("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.create("EndpointSlice", slice_object("web", [a.ip], TARGET))
    agent = node.start_agent()
    assert wait_for_nat(node, node.dnat_to(a.ip, TARGET))
    rules = node.rules()

    asked = time.monotonic()
    status = agent.terminate()
    took = time.monotonic() - asked
    print(f"\nSIGTERM -> exit in {took * 1000:.0f} ms")
    assert status == 0, agent.log_tail()
    assert took < 5.0
    assert agent.events("agent_stopped"), agent.log_tail()
    assert node.rules() == rules
    assert node.probe(client, VIP, PORT, 20) == {"web-a": 20}


def test_manifest_source_follows_file_edits(bare_node: AgentNode, tmp_path: Path) -> None:
    node = bare_node
    a = node.backend("web-a", "192.168.1.10", TARGET)
    b = node.backend("web-b", "192.168.2.10", TARGET)
    client = node.client("client", "192.168.9.9")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    path = manifests / "web.yaml"

    def write(pod_ip: str) -> None:
        docs = [service_manifest("web", VIP, PORT, TARGET), slice_object("web", [pod_ip], TARGET)]
        path.write_text(yaml.safe_dump_all(docs))

    write(a.ip)
    node.start_agent("--manifests", str(manifests))
    assert wait_for_nat(node, node.dnat_to(a.ip, TARGET))
    poller = node.poller(client, VIP, PORT, interval=0.02, timeout=0.5)
    assert poller.settled_on({"web-a"}, 0.0, streak=10, timeout=10) < float("inf")

    edited = time.monotonic()
    write(b.ip)
    settled = poller.settled_on({"web-b"}, edited, streak=20, timeout=CHANGE_BOUND + 5)
    attempts = poller.stop()
    print(f"\nmanifest edited -> traffic moved: {(settled - edited) * 1000:.0f} ms")
    assert settled - edited < CHANGE_BOUND, summarize(attempts)
    assert all(x.ok for x in attempts), summarize(attempts)
    assert node.probe(client, VIP, PORT, 50) == {"web-b": 50}
