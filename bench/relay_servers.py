"""Loopback servers and clients for relay_bench, run in processes of their own so that the
relay (in the bench's main process) does not share a GIL with them."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

HOST = "127.0.0.1"
MSG = 64


def _serve_forever(sock: socket.socket, handler: object) -> None:
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def _sink(conn: socket.socket) -> None:
    """Read to EOF, answer the byte count."""
    total, buf = 0, bytearray(1 << 20)
    with conn:
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(total.to_bytes(8, "big"))


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(65536):
            conn.sendall(data)


def _listener(handler: object) -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(1024)
    threading.Thread(target=_serve_forever, args=(sock, handler), daemon=True).start()
    return sock, sock.getsockname()[1]


def _udp_echo(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)


def run_servers(ports_out: object) -> None:
    """Child process: sink, echo (TCP) and echo (UDP); sends their ports, then serves forever."""
    _, sink = _listener(_sink)
    _, echo = _listener(_echo)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, 0))
    threading.Thread(target=_udp_echo, args=(udp,), daemon=True).start()
    ports_out.send({"sink": sink, "echo": echo, "udp": udp.getsockname()[1]})  # type: ignore[attr-defined]
    threading.Event().wait()


def bulk(port: int, seconds: float) -> float:
    """Bytes per second over one connection for about `seconds`, acknowledged by the sink."""
    block = b"\0" * (1 << 20)
    with socket.create_connection((HOST, port)) as sock:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        total = int.from_bytes(sock.recv(8), "big")
        return total / (time.perf_counter() - started)


def connection_rate(port: int, seconds: float) -> float:
    """New connections per second, each one request and reply, one client."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        with socket.create_connection((HOST, port)) as sock:
            sock.sendall(b"x")
            sock.recv(1)
        count += 1
    return count / (time.perf_counter() - started)


def _ping(port: int, seconds: float, out: list[float]) -> None:
    payload = b"p" * MSG
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.perf_counter() + seconds
        while (now := time.perf_counter()) < end:
            sock.sendall(payload)
            got = 0
            while got < MSG:
                got += len(sock.recv(MSG - got))
            out.append(time.perf_counter() - now)


def latencies(port: int, clients: int, seconds: float) -> list[float]:
    """Per-request round trips of `clients` concurrent persistent connections."""
    results: list[list[float]] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=_ping, args=(port, seconds, r)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(x for r in results for x in r)


def udp_rate(port: int, seconds: float) -> float:
    """Request/reply datagrams per second, one client."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            sock.sendto(b"q" * MSG, (HOST, port))
            with contextlib.suppress(TimeoutError):
                sock.recv(65536)
                count += 1
        return count / (time.perf_counter() - started)
