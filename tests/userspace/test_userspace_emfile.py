"""The relay at its open-file limit (a real RLIMIT_NOFILE, real EMFILE): the connection or
datagram that needed a descriptor is dropped and counted, the shortage is logged once, and the
relay serves again as soon as descriptors are free (upstream's relay exited on EMFILE)."""

from __future__ import annotations

import errno
import gc
import os
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from structlog.testing import capture_logs
from userspace_support import LOOPBACK, NoShuffle, TcpServer, UdpEcho, read_all, wait_until

from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.relay.spec import ListenerSpec
from kproxy.model.service import Protocol


@contextmanager
def no_free_descriptor() -> Iterator[None]:
    """Every descriptor this process may open is open: the next socket() or accept() fails."""
    gc.collect()  # no socket left for the collector to close in the middle
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
    held = []
    try:
        while True:  # fill whatever the limit still leaves
            try:
                held.append(os.dup(0))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def started_relay() -> Iterator[Relay]:
    relay = Relay(rng=NoShuffle(), udp_idle_timeout=5.0)
    relay.start()  # raises the soft limit: lower it only after
    try:
        yield relay
    finally:
        relay.stop()


def _failures(logs: list[dict[str, object]]) -> int:
    return sum(1 for entry in logs if entry["event"] == "relay_socket_failed")


def test_tcp_accepts_wait_out_the_shortage_and_the_connection_is_then_served() -> None:
    server = TcpServer("a")
    with started_relay() as relay, capture_logs() as logs:
        port = relay.sync({"svc": ListenerSpec(Protocol.TCP, LOOPBACK, 0, (server.addr,))}).ports[
            "svc"
        ]
        client = socket.socket()  # before the limit: the client's own descriptor
        client.settimeout(5)
        with no_free_descriptor():
            client.connect((LOOPBACK, port))  # the kernel completes it; accept() cannot
            wait_until(lambda: relay.counters()["svc"]["socket_failures"] >= 2)
        with client:
            client.sendall(b"x")
            client.shutdown(socket.SHUT_WR)
            assert read_all(client) == b"a:x"
        assert relay.alive()
    assert _failures(logs) == 1, logs


def test_a_udp_datagram_without_a_descriptor_is_dropped_and_the_next_is_served() -> None:
    echo = UdpEcho("e")
    with started_relay() as relay, capture_logs() as logs:
        port = relay.sync({"dns": ListenerSpec(Protocol.UDP, LOOPBACK, 0, (echo.addr,))}).ports[
            "dns"
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.bind((LOOPBACK, 0))
            with no_free_descriptor():
                for _ in range(3):
                    client.sendto(b"q", (LOOPBACK, port))
                wait_until(lambda: relay.counters()["dns"]["socket_failures"] == 3)
            counters = relay.counters()["dns"]
            assert counters["udp_datagrams_dropped"] == 3 and counters["udp_mappings"] == 0
            client.sendto(b"q", (LOOPBACK, port))
            assert client.recv(100) == b"e:q"
        assert relay.alive()
    assert _failures(logs) == 1, logs
