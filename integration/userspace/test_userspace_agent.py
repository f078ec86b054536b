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
        config = agent_config(extra={"mode": "userspace"})
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


CLIENT_PORT = 40053  # the UDP client's fixed source port: one conntrack flow for all its datagrams


def test_a_removed_udp_service_loses_its_flows_to_the_relay(node: AgentNode) -> None:
    dns = node.backend("dns-1", "192.168.1.53", 53, "udp")
    client = node.client("client", "192.168.9.9")
    node.api.create("Service", service_manifest("dns", VIP, 53, 53, "UDP"))
    node.api.create("EndpointSlice", slice_object("dns", [dns.ip], 53, "UDP"))
    agent = node.start_agent()
    poller = node.poller(
        client, VIP, 53, proto="udp", interval=0.05, timeout=0.5, source_port=CLIENT_PORT
    )

    def to_relay() -> list[dict[str, str]]:
        """The client's flow while it is NATed to the relay's port on the node."""
        return [
            e
            for e in node.conntrack_udp()
            if e["orig_dst"] == VIP
            and e["orig_sport"] == str(CLIENT_PORT)
            and e["reply_src"] == NODE_IP
        ]

    assert wait_until(to_relay, timeout=10), node.conntrack_udp()
    node.api.delete("EndpointSlice", slice_object("dns", [dns.ip], 53, "UDP"))
    node.api.delete("Service", service_manifest("dns", VIP, 53, 53, "UDP"))
    # Without the cleanup the client's datagrams would keep the flow, and keep reaching a proxy
    # port that the relay may give to another service next.
    deleted = wait_until(lambda: agent.events("conntrack_flows_deleted"), timeout=CHANGE_BOUND)
    # Deleted one by one (counted) or, nothing being allowed to answer, by the kernel's filter.
    assert deleted and deleted[-1]["count"] + deleted[-1]["flushed"] >= 1, agent.log_tail()
    assert wait_until(lambda: not to_relay(), timeout=5), node.conntrack_udp()
    poller.stop()
