"""The userspace relay with real sockets on 127.0.0.1: TCP, UDP, changes and counters."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from userspace_support import (
    LOOPBACK,
    NoShuffle,
    TcpServer,
    UdpEcho,
    black_hole,
    free_port,
    read_all,
    request,
    wait_until,
)

from kproxy.dataplane.relay.pump import HAS_SPLICE
from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.relay.spec import ListenerSpec
from kproxy.model.service import Protocol

TCP, UDP = Protocol.TCP, Protocol.UDP
FAST_DIALS = (0.2, 0.2, 0.2, 0.2)


@pytest.fixture(params=[True, False] if HAS_SPLICE else [False], ids=["splice", "copy"])
def relay(request: pytest.FixtureRequest) -> Iterator[Relay]:
    r = Relay(
        dial_timeouts=FAST_DIALS, use_splice=request.param, rng=NoShuffle(), udp_idle_timeout=0.1
    )
    r.start()
    yield r
    r.stop()


def tcp(*endpoints: tuple[str, int], affinity: int | None = None) -> ListenerSpec:
    return ListenerSpec(TCP, LOOPBACK, 0, tuple(endpoints), affinity)


def test_half_close_propagates_and_the_client_still_gets_its_reply(relay: Relay) -> None:
    server = TcpServer("a")
    port = relay.sync({"svc": tcp(server.addr)}).ports["svc"]
    assert request(port, b"hello") == b"a:hello"
    big = bytes(range(256)) * 20000
    assert request(port, big) == b"a:" + big


def test_round_robin_reaches_every_endpoint(relay: Relay) -> None:
    a, b = TcpServer("a"), TcpServer("b")
    port = relay.sync({"svc": tcp(a.addr, b.addr)}).ports["svc"]
    replies = {request(port, b"x") for _ in range(4)}
    assert replies == {b"a:x", b"b:x"}


def test_a_refusing_endpoint_is_skipped_every_time(relay: Relay) -> None:
    good = TcpServer("good")
    dead = (LOOPBACK, free_port())
    port = relay.sync({"svc": tcp(dead, good.addr)}).ports["svc"]
    assert all(request(port, b"x") == b"good:x" for _ in range(20))
    assert relay.counters()["svc"]["dial_failures"] >= 10


def test_no_endpoints_resets_the_client_at_once(relay: Relay) -> None:
    port = relay.sync({"svc": tcp()}).ports["svc"]
    started = time.monotonic()
    # On loopback the reset can land before connect() has returned: either place is a reset.
    with pytest.raises(ConnectionResetError), socket.create_connection((LOOPBACK, port), 2) as sock:
        sock.recv(10)
    assert time.monotonic() - started < 1.0
    wait_until(lambda: relay.counters()["svc"]["no_endpoint_rejects"] == 1)


class HoleFirst(random.Random):
    """Puts `first` at the head of the rotation: the first connection dials the black hole."""

    first: tuple[str, int] | None = None

    def shuffle(self, x: list[tuple[str, int]]) -> None:  # type: ignore[override]
        x.sort(key=lambda e: e != self.first)


def test_a_black_holed_endpoint_does_not_stall_accepts() -> None:
    good = TcpServer("good")
    rng = HoleFirst()
    relay = Relay(dial_timeouts=(1.0, 1.0), rng=rng)
    relay.start()
    try:
        with black_hole() as hole:
            rng.first = hole
            port = relay.sync({"svc": tcp(hole, good.addr)}).ports["svc"]
            slow: list[bytes] = []
            first = threading.Thread(target=lambda: slow.append(request(port, b"1")))
            first.start()
            wait_until(lambda: relay.counters()["svc"]["active_connections"] == 1)
            started = time.monotonic()
            assert request(port, b"2") == b"good:2"
            assert time.monotonic() - started < 0.5
            assert not slow  # still waiting on the black hole
            first.join(5)
            assert slow == [b"good:1"]  # moved on to the next endpoint after its timeout
    finally:
        relay.stop()


def test_established_connection_survives_endpoint_change_and_listener_removal(
    relay: Relay,
) -> None:
    a, b = TcpServer("a", mode="echo"), TcpServer("b")
    port = relay.sync({"svc": tcp(a.addr)}).ports["svc"]
    with socket.create_connection((LOOPBACK, port), timeout=3) as sock:
        sock.sendall(b"one")
        assert sock.recv(10) == b"one"
        assert relay.sync({"svc": tcp(b.addr)}).ports["svc"] == port  # same listener
        sock.sendall(b"two")
        assert sock.recv(10) == b"two"
        assert request(port, b"new") == b"b:new"
        relay.sync({})
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, port), timeout=1)
        sock.sendall(b"three")
        assert sock.recv(10) == b"three"
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""


def test_changed_bind_reopens_the_listener_and_unchanged_ones_stay(relay: Relay) -> None:
    a = TcpServer("a")
    first = relay.sync({"x": tcp(a.addr), "y": tcp(a.addr)}).ports
    fixed = free_port()
    second = relay.sync({"x": tcp(a.addr), "y": ListenerSpec(TCP, LOOPBACK, fixed, (a.addr,))})
    assert second.ports == {"x": first["x"], "y": fixed}
    assert request(fixed, b"q") == b"a:q"


def test_counters_count_connections_and_bytes(relay: Relay) -> None:
    server = TcpServer("s", mode="echo")
    port = relay.sync({"svc": tcp(server.addr)}).ports["svc"]
    with socket.create_connection((LOOPBACK, port), timeout=3) as sock:
        sock.sendall(b"12345")
        assert sock.recv(10) == b"12345"
        wait_until(lambda: relay.counters()["svc"]["bytes_to_client"] == 5)
        counters = relay.counters()["svc"]
        assert counters["active_connections"] == 1
        assert counters["bytes_to_endpoint"] == 5
    wait_until(lambda: relay.counters()["svc"]["active_connections"] == 0)
    assert relay.counters()["svc"]["connections_total"] == 1


def test_sctp_and_busy_ports_are_refused_for_that_service_port_only(relay: Relay) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        result = relay.sync(
            {
                "sctp": ListenerSpec(Protocol.SCTP, LOOPBACK),
                "busy": ListenerSpec(TCP, LOOPBACK, busy),
                "ok": tcp(),
            }
        )
    assert "SCTP is not supported" in result.errors["sctp"]
    assert "cannot listen" in result.errors["busy"]
    assert set(result.ports) == {"ok"}


def test_ports_come_from_the_port_range() -> None:
    base = 20000 + free_port() % 20000
    relay = Relay(port_range=f"{base}+20")
    relay.start()
    try:
        ports = relay.sync({i: ListenerSpec(UDP, LOOPBACK) for i in range(3)}).ports
        assert all(base <= p <= base + 20 for p in ports.values())
        assert len(set(ports.values())) == 3
    finally:
        relay.stop()


def udp_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    sock.bind((LOOPBACK, 0))
    sock.settimeout(3)
    return sock


def test_udp_replies_come_from_the_service_socket_untruncated(relay: Relay) -> None:
    echo = UdpEcho("e")
    port = relay.sync({"dns": ListenerSpec(UDP, LOOPBACK, 0, (echo.addr,))}).ports["dns"]
    with udp_client() as sock:
        sock.sendto(b"ping", (LOOPBACK, port))
        assert sock.recvfrom(65536) == (b"e:ping", (LOOPBACK, port))
        big = bytes(range(256)) * 255 + b"x" * 227  # 65507 bytes: the largest IPv4 datagram
        sock.sendto(big, (LOOPBACK, port))
        assert sock.recv(65536) == big


def test_udp_replies_leave_from_the_address_the_datagram_was_sent_to(relay: Relay) -> None:
    # A portal DNATs to a node address that need not be the one the route back to the client
    # would pick as source (a pod behind a bridge); a reply from another address misses the
    # flow's NAT. Here: sent to 127.0.0.2, while the route to 127.0.0.1 picks 127.0.0.1.
    echo = UdpEcho("e")
    port = relay.sync({"dns": ListenerSpec(UDP, "0.0.0.0", 0, (echo.addr,))}).ports["dns"]
    with udp_client() as sock:
        for _ in range(2):  # the mapping's first datagram, then a later one
            sock.sendto(b"ping", ("127.0.0.2", port))
            assert sock.recvfrom(100) == (b"e:ping", ("127.0.0.2", port))


def test_udp_mapping_per_client_expires_when_idle(relay: Relay) -> None:
    echo = UdpEcho("e")
    port = relay.sync({"dns": ListenerSpec(UDP, LOOPBACK, 0, (echo.addr,))}).ports["dns"]
    with udp_client() as one, udp_client() as two:
        for sock in (one, two, one):
            sock.sendto(b"q", (LOOPBACK, port))
            assert sock.recv(100) == b"e:q"
        assert relay.counters()["dns"]["udp_mappings"] == 2
        assert len(echo.peers) == 2
        wait_until(lambda: relay.counters()["dns"]["active_connections"] == 0, timeout=2)
        one.sendto(b"again", (LOOPBACK, port))
        assert one.recv(100) == b"e:again"
        assert relay.counters()["dns"]["udp_mappings"] == 3


def test_udp_without_endpoints_is_refused_and_a_removed_port_closes(relay: Relay) -> None:
    echo = UdpEcho("dns-1")
    port = relay.sync({"dns": ListenerSpec(UDP, LOOPBACK)}).ports["dns"]
    with udp_client() as sock:
        sock.connect((LOOPBACK, port))
        sock.send(b"q")
        with pytest.raises(ConnectionRefusedError):  # ICMP port unreachable, at once
            sock.recv(100)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, pytest.raises(OSError):
        probe.bind((LOOPBACK, port))  # still the relay's port while it refuses
    assert relay.sync({"dns": ListenerSpec(UDP, LOOPBACK, 0, (echo.addr,))}).ports["dns"] == port
    with udp_client() as sock:
        sock.sendto(b"q", (LOOPBACK, port))
        assert sock.recv(100).startswith(b"dns-1")  # endpoints back: served on the same port
    relay.sync({})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, port))  # the port is free again


def test_many_concurrent_bulk_connections_arrive_intact(relay: Relay) -> None:
    server = TcpServer("s")
    port = relay.sync({"svc": tcp(server.addr)}).ports["svc"]
    payloads = [bytes([i]) * (200_000 + i * 7919) for i in range(24)]
    replies: dict[int, bytes] = {}

    def one(i: int) -> None:
        replies[i] = request(port, payloads[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(replies[i] == b"s:" + p for i, p in enumerate(payloads))
    wait_until(lambda: relay.counters()["svc"]["active_connections"] == 0)
    assert relay.counters()["svc"]["bytes_to_endpoint"] == sum(map(len, payloads))


def test_an_endpoint_reset_resets_the_client() -> None:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        relay = Relay(rng=NoShuffle())
        relay.start()
        try:
            spec = tcp((LOOPBACK, listener.getsockname()[1]))
            port = relay.sync({"svc": spec}).ports["svc"]
            with socket.create_connection((LOOPBACK, port), timeout=3) as client:
                backend, _ = listener.accept()
                client.sendall(b"hi")
                assert backend.recv(2) == b"hi"  # the relay is past its dial: relaying now
                backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                backend.close()
                with pytest.raises(ConnectionResetError):
                    client.recv(10)
        finally:
            relay.stop()


def test_stop_ends_open_connections_and_forgets_removed_counters() -> None:
    server = TcpServer("s", mode="echo")
    relay = Relay()
    relay.start()
    port = relay.sync({"svc": tcp(server.addr)}).ports["svc"]
    with socket.create_connection((LOOPBACK, port), timeout=3) as sock:
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
        relay.sync({})
        assert "svc" in relay.counters()  # its connection still runs
        relay.stop()
        assert not relay.alive()
        assert sock.recv(1) in (b"",)  # closed by the stop, not left hanging
    relay.start()
    relay.sync({})
    assert relay.counters() == {}
    relay.stop()


def test_a_connection_without_a_pipe_falls_back_to_copying(monkeypatch: pytest.MonkeyPatch) -> None:
    from kproxy.dataplane.relay import pump

    def no_pipe() -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(pump, "_open_pipe", no_pipe)
    server = TcpServer("s")
    relay = Relay(use_splice=True)
    relay.start()
    try:
        port = relay.sync({"svc": tcp(server.addr)}).ports["svc"]
        assert request(port, b"x" * 100_000) == b"s:" + b"x" * 100_000
    finally:
        relay.stop()
