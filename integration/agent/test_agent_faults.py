"""The agent under faults: an API server outage, a compacted watch history (410 Gone), the agent
killed and restarted, someone flushing the nat table, and syncs stalled on the xtables lock.

Traffic keeps flowing wherever the rules are already right, and the agent recovers by itself.
Every test but the lock stall (the xtables lock is the iptables mode's) runs in both proxy modes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.agent_harness import (
    HEALTHZ_PORT,
    METRICS_PORT,
    AgentNode,
    agent_node,
    holding_lock,
    nat_rules,
    slice_object,
    summarize,
    wait_for_nat,
    wait_until,
)
from integration.conftest import both_modes
from integration.iptables_backend import mode_backend
from integration.manifests import service_manifest

VIP = "10.96.0.10"
PORT = 80
TARGET = 8080
OUTAGE_SECONDS = 30.0
CHANGE_BOUND = 10.0  # generous upper bound on a change reaching the rules (syncPeriod is 2 s)
# After an outage the watch reconnects on a capped backoff (30 s +-20 %, as client-go's 30 s cap).
RECONNECT_BOUND = 60.0
LOCK_TIMEOUT = 5.0  # kproxy run --lock-timeout default


@pytest.fixture
def node(tmp_path: Path, proxy_mode: str) -> Iterator[AgentNode]:
    with agent_node("fault", tmp_path, mode=proxy_mode) as built:
        yield built


def _web(node: AgentNode, *pod_ips: str) -> None:
    node.api.apply("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.apply("EndpointSlice", slice_object("web", list(pod_ips), TARGET))


@both_modes
def test_api_outage_keeps_traffic_and_later_changes_apply(node: AgentNode) -> None:
    a = node.backend("web-a", "192.168.1.10", TARGET)
    b = node.backend("web-b", "192.168.2.10", TARGET)
    client = node.client("client", "192.168.9.9")
    _web(node, a.ip)
    agent = node.start_agent()
    assert wait_for_nat(node, node.dnat_to(a.ip, TARGET))
    poller = node.poller(client, VIP, PORT, interval=0.05, timeout=1.0)
    assert poller.settled_on({"web-a"}, 0.0, streak=5, timeout=10) < float("inf")

    outage = time.monotonic()
    node.api.stop()
    time.sleep(OUTAGE_SECONDS)
    during = poller.attempts(outage)
    assert agent.proc.poll() is None, agent.log_tail()
    assert len(during) > 100 and all(x.ok for x in during), summarize(during)
    failed_watches = {e["kind"] for e in agent.events("watch_failed")}
    assert "EndpointSlice" in failed_watches, agent.log_tail()

    node.start_api()
    back = time.monotonic()
    node.api.update("EndpointSlice", slice_object("web", [b.ip], TARGET))
    settled = poller.settled_on({"web-b"}, back, streak=20, timeout=RECONNECT_BOUND)
    attempts = poller.stop()
    print(
        f"\n{len(during)} connections during the {OUTAGE_SECONDS:g} s outage, all answered; "
        f"change after the server returned applied in {settled - back:.1f} s"
    )
    assert settled - back < RECONNECT_BOUND, agent.log_tail()
    assert all(x.ok for x in attempts), summarize(attempts)
    assert agent.proc.poll() is None and len(node.agents) == 1  # the same agent, never restarted


@both_modes
def test_watch_410_relists_and_converges_to_change_made_meanwhile(node: AgentNode) -> None:
    a = node.backend("web-a", "192.168.1.10", TARGET)
    b = node.backend("web-b", "192.168.2.10", TARGET)
    client = node.client("client", "192.168.9.9")
    _web(node, a.ip)
    agent = node.start_agent()
    api = node.api
    assert api.wait_for_watches(1, "EndpointSlice", timeout=10)
    lists = api.count("list", "EndpointSlice")
    watches = api.count("watch", "EndpointSlice")

    # History compacted, and the next two watches answered 410 Gone. Ending the open watch makes
    # the agent list (1) and watch again: 410, list (2), watch: 410, list (3), watch.
    api.compact()
    api.force_410_next_watch("EndpointSlice", times=2)
    changed_with: list[int] = []

    def change_once_the_first_watch_is_refused() -> bool:
        # Runs under the server's lock as soon as the refused watch is counted: the change lands
        # after list (1), so only a relist after a 410 can bring it to the agent.
        if api.count("watch", "EndpointSlice") > watches:
            changed_with.append(api.count("list", "EndpointSlice"))
            api.update("EndpointSlice", slice_object("web", [b.ip], TARGET))
            return True
        return False

    assert api.end_watches("EndpointSlice") == 1
    assert api.wait_for(change_once_the_first_watch_is_refused, timeout=10)
    assert changed_with[0] - lists in (1, 2), "the change raced past the relists"

    assert api.wait_for_count("list", "EndpointSlice", lists + 3, timeout=CHANGE_BOUND)
    assert wait_for_nat(node, node.dnat_to(b.ip, TARGET), timeout=CHANGE_BOUND)
    expired = [e for e in agent.events("watch_expired") if e["kind"] == "EndpointSlice"]
    assert len(expired) == 2, agent.log_tail()
    assert node.probe(client, VIP, PORT, 20) == {"web-b": 20}
    assert api.count("list", "EndpointSlice") == lists + 3  # and no relist loop afterwards


@both_modes
def test_sigkill_and_restart_keep_connections_and_rules(node: AgentNode) -> None:
    pods = [node.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = node.client("client", "192.168.9.9")
    _web(node, *(p.ip for p in pods))
    agent = node.start_agent()
    assert wait_for_nat(node, node.dnat_to(pods[1].ip, TARGET))
    rules = node.rules()
    poller = node.poller(client, VIP, PORT, interval=0.02, timeout=1.0)
    assert poller.settled_on({"web-1", "web-2"}, 0.0, streak=10, timeout=10) < float("inf")

    agent.kill()
    assert agent.proc.returncode == -9
    time.sleep(1.0)
    assert node.rules() == rules  # a killed agent leaves its rules
    restarted = node.start_agent()
    restarted.wait_for_event("sync_completed", count=2, timeout=CHANGE_BOUND)  # a periodic one too
    time.sleep(0.5)
    attempts = poller.stop()

    assert node.rules() == rules
    first = restarted.syncs()[0]
    assert first["full_sync"] and first["chains_written"] == 0, first  # nothing to rewrite
    assert len(attempts) > 50 and all(x.ok for x in attempts), summarize(attempts)
    assert set(summarize(attempts)) == {"web-1", "web-2"}


@both_modes
def test_flushed_nat_table_is_restored_within_sync_period(node: AgentNode) -> None:
    a = node.backend("web-a", "192.168.1.10", TARGET)
    client = node.client("client", "192.168.9.9")
    _web(node, a.ip)
    agent = node.start_agent()
    assert wait_for_nat(node, node.dnat_to(a.ip, TARGET))
    rules = node.rules()

    backend = mode_backend(node.topo, node.mode)
    if node.mode == "nftables" or backend == "nft":
        # Another program flushes every chain of kproxy's table. The agent is stopped meanwhile
        # (SIGSTOP: it takes no lock to hold), so the broken state is seen before any repair.
        os.kill(agent.pid, signal.SIGSTOP)
        try:
            if node.mode == "nftables":
                node.node.run("nft", "flush", "table", "ip", "kube-proxy")
                assert "dnat to" not in nat_rules(node)
            else:  # iptables-nft takes no lock: the agent is what is held
                assert node.topo.foreign is not None
                node.topo.foreign.forget("iptables-nft nat")  # the CNI's chains go too
                node.iptables("-t", "nat", "-F")
                node.iptables("-t", "nat", "-X")
                assert "KUBE-" not in nat_rules(node)
            broken = node.exchange(client, VIP, PORT, timeout=0.5)
            assert not broken.ok, broken
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        flushed = time.monotonic()
    else:
        # Hold the agent's lock while flushing, so the broken state is seen before any repair.
        other_lock = node.workdir / "other-xtables.lock"
        # The flush takes Docker's nat chains too; kproxy restores only its own.
        assert node.topo.foreign is not None
        node.topo.foreign.forget("iptables-legacy nat")
        with holding_lock(node.lock_file):
            node.iptables("-t", "nat", "-F", lock_file=other_lock)
            node.iptables("-t", "nat", "-X", lock_file=other_lock)
            assert "KUBE-" not in nat_rules(node)
            broken = node.exchange(client, VIP, PORT, timeout=0.5)
            assert not broken.ok, broken
            flushed = time.monotonic()
    restored = wait_until(
        lambda: _kproxys(node, node.rules()) == _kproxys(node, rules),
        timeout=CHANGE_BOUND,
        interval=0.1,
    )
    took = time.monotonic() - flushed
    print(f"\nnat table flushed -> rules restored in {took:.1f} s (syncPeriod 2 s)")
    assert restored, agent.log_tail()
    assert node.probe(client, VIP, PORT, 20) == {"web-a": 20}


def _kproxys(node: AgentNode, rules: str) -> list[str]:
    """kproxy's part of node.rules(): in the iptables mode the lines of its chains and jumps
    (the nat flush takes Docker's too, and on an iptables-nft node kubelet's canary, which stay
    gone); the nftables mode's is its table."""
    lines = rules.splitlines()
    if node.mode == "nftables":
        return lines
    return [line for line in lines if "KUBE-" in line and "KUBE-KUBELET-CANARY" not in line]


def _health(node: AgentNode, path: str) -> tuple[int, dict[str, object]]:
    status, body = node.http_get(HEALTHZ_PORT, path)
    return status, json.loads(body)


@pytest.fixture
def legacy_node(tmp_path: Path) -> Iterator[AgentNode]:
    """A node whose kubelet writes legacy x_tables, so kproxy's iptables mode does too."""
    with agent_node("fault", tmp_path, kubelet="legacy") as built:
        yield built


# The iptables mode's legacy backend only: the stall is made by holding the xtables lock, which
# neither the nftables mode nor iptables-nft takes (each commit is one netlink transaction).
def test_healthz_turns_503_while_syncs_stall_and_200_after(legacy_node: AgentNode) -> None:
    node = legacy_node
    a = node.backend("web-a", "192.168.1.10", TARGET)
    b = node.backend("web-b", "192.168.2.10", TARGET)
    client = node.client("client", "192.168.9.9")
    _web(node, a.ip)
    agent = node.start_agent()
    assert wait_for_nat(node, node.dnat_to(a.ip, TARGET))
    assert _health(node, "/healthz")[0] == 200
    assert _health(node, "/livez")[0] == 200

    with holding_lock(node.lock_file):
        stalled = time.monotonic()
        node.api.update("EndpointSlice", slice_object("web", [b.ip], TARGET))

        def unhealthy() -> bool:
            return _health(node, "/healthz")[0] == 503

        # Unhealthy once the queued change is older than 2 x syncPeriod (4 s).
        assert wait_until(unhealthy, timeout=15, interval=0.2), agent.log_tail()
        went_bad = time.monotonic() - stalled
        status, body = _health(node, "/healthz")
        assert status == 503 and body["healthy"] is False, body
        assert _health(node, "/livez")[0] == 503
        assert "KUBE-SEP" in nat_rules(node) and b.ip not in nat_rules(node)
        assert node.probe(client, VIP, PORT, 5) == {"web-a": 5}  # old rules still serve
        # Hold on past the agent's lock timeout (5 s), so a sync gives up and is retried.
        time.sleep(max(0.0, stalled + LOCK_TIMEOUT + 1.0 - time.monotonic()))

    released = time.monotonic()
    assert wait_until(lambda: _health(node, "/healthz")[0] == 200, timeout=15, interval=0.2)
    recovered = time.monotonic() - released
    print(
        f"\nsyncs stalled: /healthz 503 after {went_bad:.1f} s (timeout 4 s), "
        f"200 again {recovered:.1f} s after the lock was released"
    )
    assert went_bad >= 3.5  # not unhealthy before the timeout (4 s)
    status, body = _health(node, "/livez")
    assert status == 200 and body["healthy"] is True, body
    assert node.probe(client, VIP, PORT, 5) == {"web-b": 5}
    assert agent.events("sync_failed"), agent.log_tail()
    _, metrics = node.http_get(METRICS_PORT, "/metrics")
    failures = [
        line
        for line in metrics.splitlines()
        if line.startswith("kubeproxy_sync_proxy_rules_iptables_restore_failures_total ")
    ]
    assert failures and float(failures[0].split()[1]) >= 1, failures


@both_modes
def test_a_second_agent_on_a_busy_healthz_port_says_so_and_exits(node: AgentNode) -> None:
    _web(node, "192.168.1.10")
    first = node.start_agent()
    second = node.start_agent(wait=False)
    assert second.proc.wait(timeout=60) == 1
    log = second.log_path.read_text()
    assert f"kproxy: error: healthzBindAddress 0.0.0.0:{HEALTHZ_PORT}: cannot listen" in log
    assert "another kproxy" in log and "Traceback" not in log
    assert first.proc.poll() is None  # the first agent is untouched
    assert node.http_get(HEALTHZ_PORT, "/healthz")[0] == 200
