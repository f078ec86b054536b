"""Real TCP/UDP traffic for the integration tests: a "who answered" server and a probing client.

    python -m integration.traffic serve --name web-1 --port 8080 --proto tcp
    python -m integration.traffic probe --target 10.96.0.10 --port 80 --proto tcp --count 100

The server answers each TCP connection and each UDP datagram with one line, `NAME PEER_IP`, so
the client learns which endpoint answered and which source address that endpoint saw (its own,
or the node's when masqueraded). With `--http` it speaks just enough HTTP/1.0 for curl.

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
import json
import selectors
import socket
import sys
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


# --- server -----------------------------------------------------------------------------------


def _answer(name: str, peer: str) -> bytes:
    return f"{name} {peer}\n".encode()


def _http_answer(name: str, peer: str) -> bytes:
    body = _answer(name, peer)
    head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _serve_tcp_connection(conn: socket.socket, name: str, http: bool) -> None:
    with conn:
        conn.settimeout(2.0)
        try:
            peer = conn.getpeername()[0]
            if http:
                request = b""
                while _HTTP_REQUEST_END not in request and len(request) < _MAX_REPLY:
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    request += chunk
                conn.sendall(_http_answer(name, peer))
            else:
                conn.sendall(_answer(name, peer))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a client that gave up; the next one matters


def serve(name: str, port: int, protos: Sequence[str], http: bool = False) -> NoReturn:
    """Answer forever on 0.0.0.0:`port` for each protocol in `protos`; prints READY once bound."""
    sel = selectors.DefaultSelector()
    for proto in protos:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        if proto == "tcp":
            sock.listen(128)
        sel.register(sock, selectors.EVENT_READ, proto)
    print(READY, flush=True)
    while True:
        for key, _ in sel.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            if key.data == "tcp":
                conn, _ = ready.accept()
                _serve_tcp_connection(conn, name, http)
            else:
                _, addr = ready.recvfrom(_MAX_REPLY)
                ready.sendto(_answer(name, addr[0]), addr)


# --- client -----------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """What `count` attempts met. `sequence` holds, per attempt, the answering backend's name or
    the failure (`refused`, `timeout`, or an errno name)."""

    answers: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    timeout: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    sequence: list[str] = field(default_factory=list)

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


def _attempt_tcp(target: str, port: int, timeout: float, http: bool) -> bytes:
    with socket.create_connection((target, port), timeout=timeout) as sock:
        if http:
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(_MAX_REPLY):
            data += chunk
        return data


def _attempt_udp(target: str, port: int, timeout: float) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((target, port))  # a connected socket reports ICMP unreachable as refused
        sock.send(b"probe\n")
        return sock.recv(_MAX_REPLY)


def _attempt(
    target: str, port: int, proto: str, timeout: float, http: bool
) -> tuple[str, str | None]:
    """(backend name, source address it saw), or (failure, None)."""
    try:
        if proto == "tcp":
            data = _attempt_tcp(target, port, timeout, http)
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
    target: str, port: int, proto: str, count: int, timeout: float, http: bool = False
) -> ProbeResult:
    answers: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    sequence = []
    for _ in range(count):
        outcome, source = _attempt(target, port, proto, timeout, http)
        sequence.append(outcome)
        if source is None:
            failures[outcome] += 1
        else:
            answers[outcome] += 1
            sources[source] += 1
    refused, timeout_count = failures.pop("refused", 0), failures.pop("timeout", 0)
    return ProbeResult(
        dict(answers), dict(sources), refused, timeout_count, dict(failures), sequence
    )


# --- running them in namespaces ---------------------------------------------------------------


def _module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "integration.traffic", *args]


_ENV = {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}


def start_server(
    topo: Topology, ns: Namespace, name: str, port: int, proto: str = "tcp", http: bool = False
) -> Popen[str]:
    """A server answering as `name` in `ns`, already listening when this returns; the topology
    kills it on close."""
    args = ["serve", "--name", name, "--port", str(port), "--proto", proto]
    proc = topo.spawn(ns, _module_argv(*args, *(["--http"] if http else [])), env=_ENV)
    line = read_line(proc, timeout=30.0)
    if line != READY:
        raise RuntimeError(f"server {name} in {ns.name} said {line!r} instead of {READY!r}")
    return proc


def probe(
    ns: Namespace,
    target: str,
    port: int,
    proto: str = "tcp",
    count: int = 1,
    timeout: float = 1.0,
    http: bool = False,
) -> ProbeResult:
    """Run `count` attempts from inside `ns` and return what they met."""
    args = ["probe", "--target", target, "--port", str(port), "--proto", proto]
    args += ["--count", str(count), "--timeout", str(timeout), *(["--http"] if http else [])]
    # Each attempt ends within about twice its timeout (connect, then read).
    proc = ns.run(*_module_argv(*args), env=_ENV, timeout=30.0 + 2 * timeout * count)
    data = json.loads(proc.stdout)
    return ProbeResult(**data)


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
    prb = sub.add_parser("probe", help="connect COUNT times and print a JSON summary")
    prb.add_argument("--target", required=True)
    prb.add_argument("--port", type=int, required=True)
    prb.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    prb.add_argument("--count", type=int, default=1)
    prb.add_argument("--timeout", type=float, default=1.0, help="seconds per attempt")
    prb.add_argument("--http", action="store_true", help="send an HTTP/1.0 GET first")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        protos = ("tcp", "udp") if args.proto == "both" else (args.proto,)
        serve(args.name, args.port, protos, args.http)  # until killed
    result = run_probe(args.target, args.port, args.proto, args.count, args.timeout, args.http)
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
