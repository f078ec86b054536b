"""The relay's caps on concurrent connections and UDP mappings, with real sockets on loopback:
at a cap a TCP client is reset and a new UDP client's datagram dropped, each refusal counted
under its reason; the flood at the open-file limit is in test_userspace_flood.py."""

from __future__ import annotations

import socket
from contextlib import ExitStack

from structlog.testing import capture_logs
from userspace_support import LOOPBACK, TcpServer, UdpEcho, read_all, wait_until

from kproxy.dataplane.relay.caps import QUIET_SECONDS, CapLimits, ConnectionCaps, default_limits
from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.relay.spec import ListenerSpec, ServicePortCounters
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.service import Protocol


def test_the_total_cap_refuses_once_every_listener_together_reaches_it() -> None:
    servers = [TcpServer(name, mode="echo") for name in ("a", "b", "c")]
    relay = Relay(caps=CapLimits(total=3, per_listener=2))
    relay.start()
    held: list[socket.socket] = []
    try:
        ports = relay.sync(
            {s.name: ListenerSpec(Protocol.TCP, LOOPBACK, 0, (s.addr,)) for s in servers}
        ).ports
        for name in ("a", "a", "b"):
            sock = socket.create_connection((LOOPBACK, ports[name]), timeout=5)
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"  # relayed: counted as active
            held.append(sock)
        assert connect_and_read(ports["c"]) == "reset"
        assert relay.counters()["c"]["refused_total_cap"] == 1
        held.pop().close()  # one ends: the next is served
        wait_until(lambda: relay.counters()["b"]["active_connections"] == 0)
        with socket.create_connection((LOOPBACK, ports["c"]), timeout=5) as sock:
            sock.sendall(b"pong")
            assert sock.recv(4) == b"pong"
    finally:
        for sock in held:
            sock.close()
        relay.stop()
        for server in servers:
            server.close()


def connect_and_read(port: int) -> str:
    """What a client that sends nothing reads; "reset" when the relay resets it (which may
    come before connect() returns)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
            return read_all(sock).decode()
    except ConnectionResetError:
        return "reset"


def test_udp_mappings_are_capped_per_service_and_the_refused_datagram_dropped() -> None:
    echo = UdpEcho("e")
    relay = Relay(caps=CapLimits(total=10, per_listener=1), udp_idle_timeout=30.0)
    relay.start()
    try:
        port = relay.sync({"dns": ListenerSpec(Protocol.UDP, LOOPBACK, 0, (echo.addr,))}).ports[
            "dns"
        ]
        with ExitStack() as stack:
            first, second = (
                stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                for _ in range(2)
            )
            for sock in (first, second):
                sock.settimeout(5)
                sock.bind((LOOPBACK, 0))
            first.sendto(b"1", (LOOPBACK, port))
            assert first.recv(100) == b"e:1"
            second.sendto(b"2", (LOOPBACK, port))
            wait_until(lambda: relay.counters()["dns"]["refused_service_cap"] == 1)
            counters = relay.counters()["dns"]
            assert counters["udp_datagrams_dropped"] == 1 and counters["active_connections"] == 1
    finally:
        relay.stop()
        echo.close()


def test_default_caps_follow_the_open_file_limit() -> None:
    assert default_limits(1 << 20) == CapLimits(total=43690, per_listener=10922)
    assert default_limits(1024) == CapLimits(total=42, per_listener=10)
    assert default_limits(10) == CapLimits(total=1, per_listener=1)


def test_refusals_are_exported_with_their_reason() -> None:
    metrics = ProxyMetrics()
    metrics.watch_relay(lambda: {"ns/svc:http": {"refused_service_cap": 3}})
    value = metrics.registry.get_sample_value(
        "kproxy_userspace_connections_refused_total",
        {"service_port": "ns/svc:http", "reason": "service_cap"},
    )
    assert value == 3


def test_a_run_of_refusals_is_logged_once_however_admits_interleave() -> None:
    now = [0.0]
    caps = ConnectionCaps(CapLimits(total=10, per_listener=1), clock=lambda: now[0])
    flooded, other = ServicePortCounters(), ServicePortCounters()
    with capture_logs() as logs:
        assert caps.admit(flooded)
        for _ in range(3):
            assert not caps.admit(flooded)
            assert caps.admit(other)  # another service is served meanwhile
            caps.release(other)
            now[0] += 1.0
        now[0] += QUIET_SECONDS  # a quiet spell ends the run: the next refusal is a new one
        assert not caps.admit(flooded)
    assert [e["reason"] for e in logs] == ["service_cap", "service_cap"]
    assert flooded.refused_service_cap == 4 and caps.active == 1
