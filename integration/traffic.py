"""Real TCP/UDP traffic for the integration tests: a "who answered" server and a probing client.

    python -m integration.traffic serve --name web-1 --port 8080 --proto tcp [--family both]
    python -m integration.traffic probe --target 10.96.0.10 --port 80 --proto tcp --count 100
    python -m integration.traffic serve --name web-1 --port 8080 --reply-after-eof
    python -m integration.traffic half-close --target 10.96.0.10 --port 80 --size 100000

The server answers each TCP connection and each UDP datagram with one line, `NAME PEER_IP`, so
the client learns which endpoint answered and which source address that endpoint saw (its own,
or the node's when masqueraded). With `--http` it speaks just enough HTTP/1.0 for curl. It listens
on IPv4 (`--family 4`, the default), IPv6 or both; the probe takes either kind of target.

The seed's nginx pods (my-nginx, the ingress controller) are Debian's nginx: see nginx.py.

With `--reply-after-eof` the server instead reads each TCP connection to its end (the client's
SHUT_WR) and only then answers, with `NAME PEER_IP LENGTH` and every byte it read, each
connection in a thread of its own (so one held open does not hold up the others); `half-close`
is its client: it sends SIZE bytes, shuts down writing and reads the whole reply.

`probe` opens one new connection (TCP) or one new socket (UDP) per attempt, so every attempt is a
new conntrack flow that the Service's rules balance afresh, and prints one JSON object: answers
per backend name, source addresses seen, and failures split into refused and timed out.

Run them inside namespaces with `start_server()` and `probe()`; both only use the standard
library, and the server is a plain socket loop (`python -m http.server` resolves its host name at
start, which hangs in a namespace without DNS).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import selectors
import socket
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import NoReturn

from integration.netns import Namespace, Topology, read_line

REPO_ROOT = Path(__file__).resolve().parent.parent
READY = "ready"
_MAX_REPLY = 4096
_HTTP_REQUEST_END = b"\r\n\r\n"
# How long a --reply-after-eof connection may stay silent: long enough for a test to hold one
# open across a resync of the agent.
_EOF_WAIT = 120.0


# --- server -----------------------------------------------------------------------------------


def _answer(name: str, peer: str) -> bytes:
    return f"{name} {peer}\n".encode()


def _http_response(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _read_request_head(conn: socket.socket) -> bytes:
    request = b""
    while _HTTP_REQUEST_END not in request and len(request) < _MAX_REPLY:
        chunk = conn.recv(1024)
        if not chunk:
            break
        request += chunk
    return request


def _serve_tcp_connection(conn: socket.socket, name: str, http: bool) -> None:
    with conn:
        conn.settimeout(2.0)
        try:
            peer = conn.getpeername()[0]
            if http:
                _read_request_head(conn)
                conn.sendall(_http_response("200 OK", _answer(name, peer)))
            else:
                conn.sendall(_answer(name, peer))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a client that gave up; the next one matters


_WILDCARD = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
FAMILIES = {"4": (socket.AF_INET,), "6": (socket.AF_INET6,), "both": tuple(_WILDCARD)}


def _serve_after_eof(conn: socket.socket, name: str) -> None:
    """Read to the client's EOF, then answer with `NAME PEER_IP LENGTH` and the bytes read."""
    with conn:
        conn.settimeout(_EOF_WAIT)
        try:
            peer = conn.getpeername()[0]
            data = bytearray()
            while chunk := conn.recv(1 << 16):
                data += chunk
            conn.sendall(f"{name} {peer} {len(data)}\n".encode() + bytes(data))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a client that gave up; the next one matters


def _listen(family: socket.AddressFamily, kind: socket.SocketKind, port: int) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # Its own socket per family: IPv4 peers then show as 1.2.3.4, not ::ffff:1.2.3.4.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((_WILDCARD[family], port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def serve(
    name: str,
    port: int,
    protos: Sequence[str],
    http: bool = False,
    family: str = "4",
    reply_after_eof: bool = False,
) -> NoReturn:
    """Answer forever on `port` for each protocol in `protos`, on the wildcard address of each
    family (`4`, `6` or `both`); prints READY once bound. With `reply_after_eof`, TCP connections
    are answered by _serve_after_eof, each in a thread."""
    sel = selectors.DefaultSelector()
    for proto in protos:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        for af in FAMILIES[family]:
            sel.register(_listen(af, kind, port), selectors.EVENT_READ, proto)
    print(READY, flush=True)
    while True:
        for key, _ in sel.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            if key.data == "tcp":
                conn, _ = ready.accept()
                if reply_after_eof:
                    threading.Thread(
                        target=_serve_after_eof, args=(conn, name), daemon=True
                    ).start()
                else:
                    _serve_tcp_connection(conn, name, http)
            else:
                _, addr = ready.recvfrom(_MAX_REPLY)
                ready.sendto(_answer(name, addr[0]), addr)


# --- client -----------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """What `count` attempts met. `sequence` holds, per attempt, the answering backend's name or
    the failure (`refused`, `timeout`, or an errno name); `seen`, per attempt, the source address
    the backend saw ("" for a failed attempt)."""

    answers: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    timeout: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    sequence: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(self.answers.values())

    @property
    def failed(self) -> int:
        return self.refused + self.timeout + sum(self.errors.values())


def _parse_answer(data: bytes, http: bool) -> tuple[str, str]:
    text = data.decode(errors="replace")
    if http:
        text = text.partition("\r\n\r\n")[2]
    words = text.split()
    if len(words) != 2:
        raise ValueError(f"unexpected answer {text!r}")
    return words[0], words[1]


def _host(target: str) -> str:
    return f"[{target}]" if ipaddress.ip_address(target).version == 6 else target


def _attempt_tcp(target: str, port: int, timeout: float, http: bool, path: str) -> bytes:
    with socket.create_connection((target, port), timeout=timeout) as sock:
        if http:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {_host(target)}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(_MAX_REPLY):
            data += chunk
        return data


def _attempt_udp(target: str, port: int, timeout: float) -> bytes:
    family = socket.AF_INET6 if ipaddress.ip_address(target).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((target, port))  # a connected socket reports ICMP unreachable as refused
        sock.send(b"probe\n")
        return sock.recv(_MAX_REPLY)


def _attempt(
    target: str, port: int, proto: str, timeout: float, http: bool, path: str
) -> tuple[str, str | None]:
    """(backend name, source address it saw), or (failure, None)."""
    try:
        if proto == "tcp":
            data = _attempt_tcp(target, port, timeout, http, path)
        else:
            data = _attempt_udp(target, port, timeout)
        return _parse_answer(data, http)
    except ConnectionRefusedError:
        return "refused", None
    except TimeoutError:
        return "timeout", None
    except (OSError, ValueError) as exc:
        code = getattr(exc, "errno", None)
        return (errno.errorcode.get(code, type(exc).__name__) if code else type(exc).__name__), None


def run_probe(
    target: str,
    port: int,
    proto: str,
    count: int,
    timeout: float,
    http: bool = False,
    path: str = "/",
) -> ProbeResult:
    answers: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    sequence, seen = [], []
    for _ in range(count):
        outcome, source = _attempt(target, port, proto, timeout, http, path)
        sequence.append(outcome)
        seen.append(source or "")
        if source is None:
            failures[outcome] += 1
        else:
            answers[outcome] += 1
            sources[source] += 1
    refused, timeout_count = failures.pop("refused", 0), failures.pop("timeout", 0)
    return ProbeResult(
        dict(answers), dict(sources), refused, timeout_count, dict(failures), sequence, seen
    )


@dataclass
class HalfCloseReply:
    """What a --reply-after-eof server answered: its name, the source address it saw, how many
    bytes it read, and whether the bytes it sent back are exactly the ones sent (`echoed`)."""

    name: str
    source: str
    length: int
    echoed: bool


def read_reply_after_eof(sock: socket.socket, sent: bytes) -> HalfCloseReply:
    """Shut down writing on a connection to a --reply-after-eof server, then read its whole
    answer."""
    sock.shutdown(socket.SHUT_WR)
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    head, _, body = bytes(data).partition(b"\n")
    name, source, length = head.decode(errors="replace").split()
    return HalfCloseReply(name, source, int(length), body == sent)


def half_close_exchange(target: str, port: int, size: int, timeout: float) -> HalfCloseReply:
    """Connect, send `size` bytes, shut down writing and read the whole reply."""
    payload = bytes(i % 251 for i in range(size))  # not all zeroes: a shifted copy differs
    with socket.create_connection((target, port), timeout=timeout) as sock:
        sock.sendall(payload)
        return read_reply_after_eof(sock, payload)


# --- running them in namespaces ---------------------------------------------------------------


def _module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "integration.traffic", *args]


_ENV = {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}


def _start(topo: Topology, ns: Namespace, what: str, args: Sequence[str]) -> Popen[str]:
    proc = topo.spawn(ns, _module_argv(*args), env=_ENV)
    line = read_line(proc, timeout=30.0)
    if line != READY:
        raise RuntimeError(f"{what} in {ns.name} said {line!r} instead of {READY!r}")
    return proc


def start_server(
    topo: Topology,
    ns: Namespace,
    name: str,
    port: int,
    proto: str = "tcp",
    http: bool = False,
    family: str = "4",
    reply_after_eof: bool = False,
) -> Popen[str]:
    """A server answering as `name` in `ns` on IPv4, IPv6 or both (`family`), already listening
    when this returns; the topology kills it on close. `reply_after_eof`: see the module doc."""
    args = ["serve", "--name", name, "--port", str(port), "--proto", proto, "--family", family]
    args += ["--http"] if http else []
    args += ["--reply-after-eof"] if reply_after_eof else []
    return _start(topo, ns, f"server {name}", args)


def probe(
    ns: Namespace,
    target: str,
    port: int,
    proto: str = "tcp",
    count: int = 1,
    timeout: float = 1.0,
    http: bool = False,
    path: str = "/",
) -> ProbeResult:
    """Run `count` attempts from inside `ns` and return what they met (with `http`, each attempt
    is a GET of `path`)."""
    args = ["probe", "--target", target, "--port", str(port), "--proto", proto]
    args += ["--count", str(count), "--timeout", str(timeout)]
    args += ["--http", "--path", path] if http else []
    # Each attempt ends within about twice its timeout (connect, then read).
    proc = ns.run(*_module_argv(*args), env=_ENV, timeout=30.0 + 2 * timeout * count)
    data = json.loads(proc.stdout)
    return ProbeResult(**data)


def half_close(
    ns: Namespace, target: str, port: int, size: int, timeout: float = 5.0
) -> HalfCloseReply:
    """One half_close_exchange from inside `ns`."""
    args = ["half-close", "--target", target, "--port", str(port), "--size", str(size)]
    proc = ns.run(*_module_argv(*args, "--timeout", str(timeout)), env=_ENV, timeout=30 + timeout)
    return HalfCloseReply(**json.loads(proc.stdout))


# --- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m integration.traffic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="answer every connection/datagram with `NAME PEER_IP`")
    srv.add_argument("--name", required=True)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--proto", choices=("tcp", "udp", "both"), default="tcp")
    srv.add_argument("--http", action="store_true", help="answer TCP as an HTTP/1.0 server")
    srv.add_argument("--family", choices=tuple(FAMILIES), default="4", help="IPv4, IPv6 or both")
    srv.add_argument(
        "--reply-after-eof",
        action="store_true",
        help="read each TCP connection to its end, then answer `NAME PEER_IP LENGTH` + the bytes",
    )
    prb = sub.add_parser("probe", help="connect COUNT times and print a JSON summary")
    prb.add_argument("--target", required=True)
    prb.add_argument("--port", type=int, required=True)
    prb.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    prb.add_argument("--count", type=int, default=1)
    prb.add_argument("--timeout", type=float, default=1.0, help="seconds per attempt")
    prb.add_argument("--http", action="store_true", help="send an HTTP/1.0 GET first")
    prb.add_argument("--path", default="/", help="the path to GET with --http")
    hcl = sub.add_parser("half-close", help="send SIZE bytes, SHUT_WR, read the whole reply")
    hcl.add_argument("--target", required=True)
    hcl.add_argument("--port", type=int, required=True)
    hcl.add_argument("--size", type=int, default=100_000)
    hcl.add_argument("--timeout", type=float, default=5.0, help="seconds per socket operation")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        protos = ("tcp", "udp") if args.proto == "both" else (args.proto,)
        serve(args.name, args.port, protos, args.http, args.family, args.reply_after_eof)
    if args.command == "half-close":
        reply = half_close_exchange(args.target, args.port, args.size, args.timeout)
        json.dump(asdict(reply), sys.stdout)
        sys.stdout.write("\n")
        return 0
    result = run_probe(
        args.target, args.port, args.proto, args.count, args.timeout, args.http, args.path
    )
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
