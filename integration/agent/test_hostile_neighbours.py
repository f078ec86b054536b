"""The agent's HTTP servers against hosts off the node (the `outside` namespace stands in for one):
floods of half-sent requests, an open-file limit cut under a flood, `/statusz` asked from off the
node, and a healthCheckNodePort someone else held when the Service came.

The figures printed (threads, RSS, `/livez` latency under the flood) go in the closing note; the
assertions are what must hold, with generous bounds only as failure limits.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.agent_harness import (
    HEALTHZ_PORT,
    METRICS_PORT,
    AgentNode,
    agent_config,
    agent_node,
    slice_object,
    wait_for_nat,
    wait_until,
)
from integration.hostile import get, proc_status, start_flood, threads, timed_get
from integration.manifests import service_manifest
from integration.netns import NODE_IP, read_line, run_kproxy, stop

VIP = "10.96.0.10"
PORT = 80
TARGET = 8080
NODE_PORT = 30080
HEALTH_CHECK_NODE_PORT = 32100
LB_IP = "203.0.113.20"
THREAD_LIMIT = 100
LOOPBACK = "127.0.0.1"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AgentNode]:
    with agent_node("hostile", tmp_path) as built:
        yield built


def web(node: AgentNode, *pod_ips: str) -> None:
    node.api.apply(
        "Service",
        service_manifest(
            "web",
            VIP,
            PORT,
            TARGET,
            node_port=NODE_PORT,
            load_balancer_ips=[LB_IP],
            external_policy="Local",
            health_check_node_port=HEALTH_CHECK_NODE_PORT,
        ),
    )
    node.api.apply("EndpointSlice", slice_object("web", list(pod_ips), TARGET))


def test_a_health_check_node_port_held_by_another_program_is_served_once_free(
    node: AgentNode,
) -> None:
    blocker = node.worker(node.node).call(
        lambda: socket.create_server(("0.0.0.0", HEALTH_CHECK_NODE_PORT))
    )
    try:
        agent = node.start_agent()
        web(node, "192.168.1.10", "192.168.1.11")
        agent.wait_for_event("health_check_listen_failed")
        synced = len(agent.syncs())
        agent.wait_for_event("sync_completed", count=synced + 3)  # tried again, failing
    finally:
        node.worker(node.node).call(blocker.close)
    failures = agent.events("health_check_listen_failed")
    addresses = [event.get("address") for event in failures]
    assert len(addresses) == len(set(addresses)), failures  # one warning, not one per sync

    def answered() -> tuple[int, Any] | None:
        try:
            return get(node, node.topo.outside, NODE_IP, HEALTH_CHECK_NODE_PORT, "/")
        except OSError:
            return None

    answer = wait_until(answered, timeout=15, interval=0.2)
    assert answer == (
        200,
        {
            "service": {"namespace": "default", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": True,
        },
    ), agent.log_tail()
    assert agent.events("health_check_listening"), agent.log_tail()


def test_statusz_is_served_on_the_metrics_address_only(node: AgentNode) -> None:
    doc = agent_config()
    del doc["metricsBindAddress"]  # the default, 127.0.0.1:10249
    node.config_file.write_text(yaml.safe_dump(doc))
    node.api.apply("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.apply("EndpointSlice", slice_object("web", ["192.168.1.10"], TARGET))
    node.start_agent()
    outside = node.topo.outside

    assert get(node, outside, NODE_IP, HEALTHZ_PORT, "/statusz")[0] == 404
    assert get(node, outside, NODE_IP, HEALTHZ_PORT, "/healthz")[0] == 200
    with pytest.raises(ConnectionRefusedError):
        get(node, outside, NODE_IP, METRICS_PORT, "/statusz")
    status, body = get(node, node.node, "127.0.0.1", METRICS_PORT, "/statusz")
    assert status == 200 and body["mode"] == "iptables", body
    assert get(node, node.node, "127.0.0.1", HEALTHZ_PORT, "/statusz")[0] == 404

    shown = run_kproxy(
        node.node, "status", "--config", str(node.config_file), lock_file=node.lock_file
    )
    assert "mode:        iptables" in shown.stdout, shown


def test_a_flood_of_half_sent_requests_from_off_the_node(node: AgentNode) -> None:
    node.api.apply("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.apply("EndpointSlice", slice_object("web", ["192.168.1.10"], TARGET))
    agent = node.start_agent()
    before = threads(agent.pid)
    outside = node.topo.outside
    count = 3000
    flood, connected = start_flood(node, HEALTHZ_PORT, count)
    try:
        held = int(connected.split()[1])
        most = 0
        latencies = []
        for _ in range(5):
            most = max(most, threads(agent.pid))
            livez, livez_seconds = timed_get(node, node.node, LOOPBACK, HEALTHZ_PORT, "/livez")
            healthz, healthz_seconds = timed_get(node, outside, NODE_IP, HEALTHZ_PORT, "/healthz")
            assert (livez, healthz) == (200, 200), agent.log_tail()
            latencies.append((livez_seconds, healthz_seconds))
            most = max(most, threads(agent.pid))
            time.sleep(0.5)
        rss = proc_status(agent.pid)["VmRSS"]
        assert agent.proc.poll() is None, agent.log_tail()
    finally:
        reopened = read_line(flood, timeout=10)  # the first second's: `open N reopened M`
        stop(flood)
    print(
        f"\n{held} of {count} connections held from off the node ({reopened!r} after 1 s): "
        f"agent threads {before} before, at most {most} "
        f"during, RSS {rss}; /livez (loopback) and /healthz (off node) took "
        + ", ".join(f"{a * 1000:.0f}/{b * 1000:.0f} ms" for a, b in latencies)
    )
    assert held > count // 2, connected
    assert most < THREAD_LIMIT


def test_a_half_sent_request_is_closed_after_the_read_timeout(node: AgentNode) -> None:
    node.start_agent()

    def half_sent() -> bytes:
        with socket.create_connection((NODE_IP, HEALTHZ_PORT), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\n")
            return sock.recv(4096)  # b"" once the server closes; TimeoutError if it never does

    assert node.worker(node.topo.outside).call(half_sent, timeout=60) == b""


def test_an_open_file_limit_of_128_under_a_flood_degrades_and_recovers(node: AgentNode) -> None:
    node.api.apply("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.apply("EndpointSlice", slice_object("web", ["192.168.1.10"], TARGET))
    agent = node.start_agent()
    resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (128, 128))
    flood, connected = start_flood(node, HEALTHZ_PORT, 300)
    try:
        node.api.apply("EndpointSlice", slice_object("web", ["192.168.1.11"], TARGET))
        answers = []
        for _ in range(5):
            answers.append(get(node, node.node, "127.0.0.1", HEALTHZ_PORT, "/livez")[0])
            time.sleep(1.0)
        alive_during = agent.proc.poll() is None
    finally:
        stop(flood)
    assert alive_during, agent.log_tail()
    assert set(answers) <= {200, 503}, answers  # answered, whatever its verdict
    assert wait_for_nat(node, node.dnat_to("192.168.1.11", TARGET), timeout=30), agent.log_tail()
    assert agent.proc.poll() is None, agent.log_tail()
    assert wait_until(
        lambda: get(node, node.node, "127.0.0.1", HEALTHZ_PORT, "/livez")[0] == 200, 30, 0.5
    ), agent.log_tail()
    _, metrics = get(node, node.node, "127.0.0.1", METRICS_PORT, "/metrics")
    refused = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('kproxy_http_accept_errors_total{error="EMFILE",server="healthz"}')
    ]
    warnings = agent.events("accept_failed")
    print(
        f"\nopen-file limit 128, flood {connected!r}: /livez answered {answers}; "
        f"{refused} accepts failed with EMFILE, {len(warnings)} warning(s), "
        f"{len(agent.events('sync_failed'))} failed syncs, then recovered"
    )
    assert refused and refused[0] >= 1, metrics
    assert len(warnings) == 1, warnings
