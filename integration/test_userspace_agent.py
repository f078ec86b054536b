"""The long-lived agent (`kproxy run`) in userspace mode, fed by the test API server: an endpoint
change reaches the relay's balancer without closing its listener, so new connections go to the new
endpoint while a connection opened before the change keeps carrying bytes both ways."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from integration.agent_harness import (
    AgentNode,
    NetnsWorker,
    agent_config,
    agent_node,
    slice_object,
    wait_until,
)
from integration.manifests import service_manifest
from integration.netns import NODE_IP, Pod
from integration.traffic import (
    HalfCloseReply,
    half_close_exchange,
    read_reply_after_eof,
    start_server,
)

VIP = "10.96.0.10"
PORT = 80
TARGET = 8080
CHANGE_BOUND = 15.0  # generous upper bound on an API change reaching traffic (syncPeriod is 2 s)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AgentNode]:
    with agent_node("usagent", tmp_path) as built:
        # bindAddress: see _config in test_userspace.py.
        config = agent_config(extra={"mode": "userspace", "bindAddress": NODE_IP})
        built.config_file.write_text(yaml.safe_dump(config))
        yield built


def _backend(node: AgentNode, name: str, ip: str) -> Pod:
    """A pod whose server reads each connection to its end before answering, one thread per
    connection, so a connection held open does not hold up the others."""
    pod = node.topo.add_pod(name, ip)
    start_server(node.topo, pod.ns, name, TARGET, reply_after_eof=True)
    return pod


def _exchange(worker: NetnsWorker) -> HalfCloseReply | None:
    """One short connection through the VIP from the worker's namespace; None if it failed."""

    def attempt() -> HalfCloseReply | None:
        try:
            return half_close_exchange(VIP, PORT, 1000, timeout=2.0)
        except (OSError, ValueError):
            return None

    return worker.call(attempt)


def _payload(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 256 for i in range(size))


def test_an_endpoint_change_moves_new_connections_and_an_open_one_keeps_streaming(
    node: AgentNode,
) -> None:
    a = _backend(node, "web-a", "192.168.1.10")
    b = _backend(node, "web-b", "192.168.2.10")
    client = node.client("client", "192.168.9.9")
    node.api.create("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.create("EndpointSlice", slice_object("web", [a.ip], TARGET))
    node.start_agent()
    worker = node.worker(client.ns)

    def answered_by(name: str) -> bool:
        reply = _exchange(worker)
        return reply is not None and reply.name == name and reply.echoed

    assert wait_until(lambda: answered_by("web-a"), CHANGE_BOUND), "web-a never answered"
    # Opened in the client's namespace by its worker thread; any thread may use it after.
    stream = worker.call(lambda: socket.create_connection((VIP, PORT), timeout=10.0))
    try:
        before, after = _payload(200_000, 1), _payload(200_000, 2)
        stream.sendall(before)

        node.api.update("EndpointSlice", slice_object("web", [b.ip], TARGET))
        assert wait_until(lambda: answered_by("web-b"), CHANGE_BOUND), "web-b never answered"
        later = [_exchange(worker) for _ in range(10)]

        stream.sendall(after)  # to the old endpoint, through the relay, after the change
        kept = read_reply_after_eof(stream, before + after)
    finally:
        stream.close()

    assert all(r is not None and r.name == "web-b" for r in later), later
    # The connection opened before the change still reached web-a with every byte, and web-a's
    # whole answer came back through the relay.
    assert (kept.name, kept.source, kept.length) == ("web-a", NODE_IP, 400_000), kept
    assert kept.echoed, kept
