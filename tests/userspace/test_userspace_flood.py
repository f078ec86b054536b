"""A flood of connections to one service at a node's open-file limit (real sockets on
loopback, a real RLIMIT_NOFILE): the relay's default caps, derived from that limit, keep the
flood to its share, so another service's connection is still relayed. Upstream's relay, and
kproxy's before the caps, accepted until EMFILE and then starved every service."""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from structlog.testing import capture_logs
from userspace_support import LOOPBACK, TcpServer, request, wait_until

from kproxy.dataplane.relay import relay as relay_module
from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.relay.spec import ListenerSpec
from kproxy.model.service import Protocol

FLOOD = 120
# Descriptors the relay may open beyond what the test holds: about 25 spliced connections.
HEADROOM = 150


@contextmanager
def open_files_limit(limit: int) -> Iterator[None]:
    """The soft RLIMIT_NOFILE at `limit`, restored after (the hard limit cannot be lowered
    reversibly without CAP_SYS_RESOURCE, so the relay is kept from raising the soft one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _never_accepting() -> socket.socket:
    """An endpoint whose connections complete in its backlog: they hold no descriptor here."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen(socket.SOMAXCONN)
    return sock


def test_a_flood_on_one_service_leaves_another_served_at_the_open_file_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A node whose hard limit is this low: the relay's caps follow from it.
    monkeypatch.setattr(relay_module, "raise_open_files_limit", lambda: None)
    flooded_backend = _never_accepting()
    other = TcpServer("b")
    clients = [socket.socket() for _ in range(FLOOD)]  # opened before the limit is lowered
    with ExitStack() as stack:
        stack.callback(flooded_backend.close)
        stack.callback(other.close)
        for client in clients:
            stack.callback(client.close)
        stack.enter_context(open_files_limit(_open_count() + HEADROOM))
        relay = Relay()
        relay.start()
        stack.callback(relay.stop)
        logs = stack.enter_context(capture_logs())
        ports = relay.sync(
            {
                "flooded": ListenerSpec(
                    Protocol.TCP, LOOPBACK, 0, (flooded_backend.getsockname(),)
                ),
                "other": ListenerSpec(Protocol.TCP, LOOPBACK, 0, (other.addr,)),
            }
        ).ports
        for client in clients:
            # Not waited for: the kernel completes it, and the relay may reset it at once.
            client.setblocking(False)
            client.connect_ex((LOOPBACK, ports["flooded"]))

        def flood_handled() -> bool:
            c = relay.counters()["flooded"]
            refused = c.get("refused_service_cap", 0) + c.get("refused_total_cap", 0)
            return c["socket_failures"] > 0 or c["active_connections"] + refused == FLOOD

        wait_until(flood_handled, timeout=10)
        # Headroom is left for the other service: its connection is relayed.
        assert request(ports["other"], b"x") == b"b:x"
        flooded = relay.counters()["flooded"]
        assert flooded["active_connections"] == relay.limits().per_listener
        assert flooded["refused_service_cap"] == FLOOD - relay.limits().per_listener
        assert flooded["socket_failures"] == 0
        # A refused client got a reset, not a hang.
        refused = [c for c in clients if _was_reset(c)]
        assert len(refused) == FLOOD - relay.limits().per_listener
    assert [e["reason"] for e in logs if e["event"] == "relay_connection_refused"] == [
        "service_cap"
    ]


def _was_reset(client: socket.socket) -> bool:
    client.settimeout(0.0)
    try:
        client.recv(1)
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False
    return False
