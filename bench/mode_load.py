"""Servers and load generators for mode_bench, run inside the pod namespaces (`ip netns exec`).

    python -m bench.mode_load serve
    python -m bench.mode_load client --kind connect --targets 10.96.100.11:80 --clients 32 \
        --seconds 2 --start-at 1764590000.5

`serve` answers on three ports: SINK_PORT (TCP: reads to EOF, answers the byte count),
ECHO_PORT (TCP: echoes whatever arrives) and DNS_PORT (UDP: echoes each datagram, a DNS-sized
question and answer). It prints `ready` once bound.

`client` runs one kind of load with `--clients` concurrent clients in this one process, from
`--start-at` (wall clock, so several processes started one after another begin together) for
`--seconds`, and prints one JSON object: operations completed, bytes, per-operation latencies in
microseconds, errors, and this process's CPU seconds (user + system) over the window, which
tells whether the client itself was the bottleneck.

Kinds: `bulk` (each client streams to the sink until the window ends, then waits for the sink's
byte count: bytes are counted as acknowledged, and the time runs until the last answer, so what
sits in buffers at the end is neither lost nor counted early); `connect` (connect, one small
request and reply, close: latency from connect to reply); `persistent` (small requests on one
connection per client: latency per request); `udp` (one datagram question, one answer, per
client socket; a question unanswered after UDP_RESEND seconds is counted lost and resent).

One client is a plain blocking loop; more run on one selectors loop, non-blocking, so 64
clients cost one thread and one process does not fight itself for the GIL.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import selectors
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SINK_PORT = 9001
ECHO_PORT = 9002
DNS_PORT = 5353
MSG = 64
BLOCK = 1 << 18
UDP_RESEND = 0.5
READY = "ready"
KINDS = ("bulk", "connect", "persistent", "udp")


# --- servers -----------------------------------------------------------------------------------


def _listen(port: int, kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(4096)
    sock.setblocking(False)
    return sock


@dataclass
class _Conn:
    sock: socket.socket
    sink: bool
    received: int = 0


def serve() -> None:
    """The three servers on one selectors loop (one process per pod)."""
    sel = selectors.DefaultSelector()
    sink, echo, dns = (
        _listen(SINK_PORT, socket.SOCK_STREAM),
        _listen(ECHO_PORT, socket.SOCK_STREAM),
        _listen(DNS_PORT, socket.SOCK_DGRAM),
    )
    for sock in (sink, echo, dns):
        sel.register(sock, selectors.EVENT_READ)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    print(READY, flush=True)
    while True:
        for key, _ in sel.select():
            obj = key.fileobj
            if obj is dns:
                _answer_datagrams(dns)
            elif obj is sink or obj is echo:
                _accept_all(sel, obj, obj is sink)  # type: ignore[arg-type]
            else:
                _serve_readable(sel, key.data, view)


def _answer_datagrams(sock: socket.socket) -> None:
    while True:
        try:
            data, peer = sock.recvfrom(4096)
        except BlockingIOError:
            return
        sock.sendto(data, peer)


def _accept_all(sel: selectors.BaseSelector, listener: socket.socket, sink: bool) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(conn, selectors.EVENT_READ, _Conn(conn, sink))


def _serve_readable(sel: selectors.BaseSelector, conn: _Conn, view: memoryview) -> None:
    try:
        n = conn.sock.recv_into(view)
    except BlockingIOError:
        return
    except OSError:
        n = 0
    if n and conn.sink:
        conn.received += n
        return
    if n:
        # Small requests: the socket's send buffer takes them whole.
        try:
            conn.sock.sendall(view[:n])
        except OSError:
            pass
        else:
            return
    sel.unregister(conn.sock)
    if conn.sink:
        conn.sock.setblocking(True)
        with contextlib.suppress(OSError):
            conn.sock.sendall(conn.received.to_bytes(8, "big"))
    conn.sock.close()


# --- clients -----------------------------------------------------------------------------------


@dataclass
class Result:
    ops: int = 0
    bytes: int = 0
    errors: int = 0
    latencies_us: list[int] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tcp(target: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(target, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise ConnectionError("closed before the reply was complete")
        got += chunk
    return got


def _one_blocking(kind: str, target: tuple[str, int], end: float, out: Result) -> None:
    """One client, blocking calls: the lowest overhead per operation."""
    payload = b"q" * MSG
    now = time.perf_counter
    if kind == "bulk":
        block = b"\0" * (1 << 20)
        with _tcp(target) as sock:
            while now() < end:
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
            out.bytes += int.from_bytes(_recv_exactly(sock, 8), "big")
            out.ops += 1
    elif kind == "connect":
        while (t := now()) < end:
            try:
                with _tcp(target) as sock:
                    sock.sendall(payload)
                    _recv_exactly(sock, MSG)
            except OSError:
                out.errors += 1
                continue
            out.latencies_us.append(int((now() - t) * 1e6))
    elif kind == "persistent":
        with _tcp(target) as sock:
            while (t := now()) < end:
                sock.sendall(payload)
                _recv_exactly(sock, MSG)
                out.latencies_us.append(int((now() - t) * 1e6))
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(UDP_RESEND)
            sock.connect(target)
            while (t := now()) < end:
                sock.send(payload)
                try:
                    sock.recv(4096)
                except TimeoutError:
                    out.errors += 1
                    continue
                out.latencies_us.append(int((now() - t) * 1e6))
    out.ops += len(out.latencies_us)


class _Client:
    """One non-blocking client on the shared selector: a small state machine per kind."""

    def __init__(self, loop: _Loop, target: tuple[str, int]) -> None:
        self.loop = loop
        self.target = target
        self.sock: socket.socket | None = None
        self.started = 0.0
        self.got = 0
        self.sent = 0

    # each handler returns nothing; it re-registers the socket for what it waits on next
    def begin(self) -> None:
        kind = self.loop.kind
        if kind == "udp":
            if self.sock is None:  # one socket (one source port) per client, as a resolver
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.sock.setblocking(False)
                self.sock.connect(self.target)
            self._ask_udp()
        elif kind == "connect" or self.sock is None:
            self._connect()
        else:
            self._request()

    def _connect(self) -> None:
        self.started = time.perf_counter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        err = sock.connect_ex(self.target)
        if err not in (0, errno.EINPROGRESS):
            self._fail()
            return
        self.loop.wait(self, selectors.EVENT_WRITE, self._connected)

    def _connected(self) -> None:
        assert self.sock is not None
        if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._fail()
        elif self.loop.kind == "bulk":
            self.sent = 0
            self._stream()
        else:
            # connect + request is timed from the connect; a persistent client's first request
            # is timed on its own
            self._request(keep_start=self.loop.kind == "connect")

    def _request(self, keep_start: bool = False) -> None:
        assert self.sock is not None
        if not keep_start:
            self.started = time.perf_counter()
        try:
            self.sock.send(self.loop.payload)  # 64 bytes: an empty send buffer takes them
        except OSError:
            self._fail()
            return
        self.got = 0
        self.loop.wait(self, selectors.EVENT_READ, self._reply)

    def _reply(self) -> None:
        assert self.sock is not None
        try:
            n = len(self.sock.recv(MSG - self.got))
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            self._fail()
            return
        self.got += n
        if self.got < MSG:
            return
        self.loop.done(self, time.perf_counter() - self.started)
        if self.loop.kind == "connect":
            self.loop.forget(self.sock)
            self.sock.close()
            self.sock = None
        self.loop.next(self)

    def _stream(self) -> None:
        assert self.sock is not None
        if time.perf_counter() >= self.loop.end:
            self.sock.shutdown(socket.SHUT_WR)
            self.got = 0
            self.loop.wait(self, selectors.EVENT_READ, self._acked)
            return
        with contextlib.suppress(BlockingIOError):
            self.sent += self.sock.send(self.loop.block)
        self.loop.wait(self, selectors.EVENT_WRITE, self._stream)

    def _acked(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(8)
        if len(data) != 8:
            self._fail()
            return
        self.loop.result.bytes += int.from_bytes(data, "big")
        self.loop.result.ops += 1
        self.loop.forget(self.sock)
        self.sock.close()
        self.sock = None
        self.loop.finished += 1

    def _ask_udp(self) -> None:
        assert self.sock is not None
        self.started = time.perf_counter()
        self.sock.send(self.loop.payload)
        self.loop.wait(self, selectors.EVENT_READ, self._udp_answer)

    def _udp_answer(self) -> None:
        assert self.sock is not None
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return
        self.loop.done(self, time.perf_counter() - self.started)
        self.loop.next(self)

    def resend_if_lost(self, now: float) -> None:
        if self.loop.kind == "udp" and now - self.started > UDP_RESEND:
            self.loop.result.errors += 1
            self._ask_udp()

    def _fail(self) -> None:
        self.loop.result.errors += 1
        if self.sock is not None:
            self.loop.forget(self.sock)
            self.sock.close()
            self.sock = None
        if self.loop.kind == "bulk":
            self.loop.finished += 1
        else:
            self.loop.next(self)


class _Loop:
    def __init__(self, kind: str, end: float) -> None:
        self.kind = kind
        self.end = end
        self.sel = selectors.DefaultSelector()
        self.result = Result()
        self.payload = b"q" * MSG
        self.block = b"\0" * BLOCK
        self.finished = 0

    def wait(self, client: _Client, events: int, then: Callable[[], None]) -> None:
        assert client.sock is not None
        try:
            self.sel.modify(client.sock, events, (client, then))
        except KeyError:
            self.sel.register(client.sock, events, (client, then))

    def forget(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError):
            self.sel.unregister(sock)

    def done(self, client: _Client, seconds: float) -> None:
        self.result.ops += 1
        self.result.latencies_us.append(int(seconds * 1e6))

    def next(self, client: _Client) -> None:
        if time.perf_counter() < self.end:
            client.begin()
        else:
            if client.sock is not None:
                self.forget(client.sock)
                client.sock.close()
                client.sock = None
            self.finished += 1

    def run(self, clients: list[_Client]) -> None:
        for client in clients:
            client.begin()
        last_check = time.perf_counter()
        while self.finished < len(clients):
            for key, _ in self.sel.select(timeout=0.1):
                client, then = key.data
                if key.fileobj is client.sock:  # not a socket closed earlier in this batch
                    then()
            now = time.perf_counter()
            if now - last_check > 0.1:
                last_check = now
                for client in clients:
                    client.resend_if_lost(now)
                if now > self.end + 30:
                    break  # a bulk answer that never came: counted as not acknowledged


def run_client(
    kind: str, targets: list[tuple[str, int]], clients: int, seconds: float, start_at: float
) -> Result:
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    cpu0, t0 = _cpu(), time.perf_counter()
    end = t0 + seconds
    if clients == 1:
        result = Result()
        _one_blocking(kind, targets[0], end, result)
    else:
        loop = _Loop(kind, end)
        loop.run([_Client(loop, targets[i % len(targets)]) for i in range(clients)])
        result = loop.result
    result.wall = time.perf_counter() - t0
    result.cpu = _cpu() - cpu0
    return result


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mode_load")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    client = sub.add_parser("client")
    client.add_argument("--kind", choices=KINDS, required=True)
    client.add_argument("--targets", required=True, help="HOST:PORT[,HOST:PORT...]")
    client.add_argument("--clients", type=int, default=1)
    client.add_argument("--seconds", type=float, default=2.0)
    client.add_argument("--start-at", type=float, default=0.0, help="wall-clock start time")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve()
        return 0
    targets = [_target(t) for t in args.targets.split(",")]
    result = run_client(args.kind, targets, args.clients, args.seconds, args.start_at)
    json.dump(result.__dict__, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    os._exit(0)  # nothing left to clean up; skip the interpreter's teardown


if __name__ == "__main__":
    raise SystemExit(main())
