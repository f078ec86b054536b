"""kproxy's small HTTP servers (/healthz and /livez, healthCheckNodePorts, /metrics and /statusz).

Anyone who can reach the node can connect to them, so they must hold under a flood: one thread per
server group serves every listening socket and connection from a selector (never a thread per
connection), connections are capped (the oldest is dropped to make room for a new one, so a flood
of idle connections cannot starve the kubelet's probe), a request must arrive whole within
`read_timeout`, and the listen backlog is the node's somaxconn, as Go's servers use. Running out of
descriptors in accept (EMFILE) halves the cap and drops the oldest connections to it (leaving
descriptors to the rest of the agent), pauses accepting briefly, is counted and logged once a
minute at most; it never ends the thread.

Answers are small and made at once (health JSON, metrics text); every connection gets one answer
and is closed (`Connection: close`): load balancers and the kubelet probe that way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import resource
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import structlog

log = structlog.get_logger("kproxy.health")

READ_TIMEOUT = 5.0  # a whole request, from accept; then as long again to write the answer
MAX_REQUEST = 8192  # request line and headers
ACCEPT_PAUSE = 0.05  # after accept ran out of descriptors
_MIN_CONNECTIONS = 8
_WARN_EVERY = 60.0
# accept failures that say "the process or system is out of something", not "this client".
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query


@dataclass(frozen=True)
class Response:
    code: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Response]


def json_response(code: int, body: object, headers: dict[str, str] | None = None) -> Response:
    extra = (("X-Content-Type-Options", "nosniff"), *(headers or {}).items())
    return Response(code, json.dumps(body).encode(), "application/json", extra)


def listen_backlog() -> int:
    """The node's net.core.somaxconn (what Go's listeners ask for), else the C library's."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


def default_max_connections() -> int:
    """A share of the open-file limit, so a flood of connections leaves descriptors for the
    rest of the agent (netlink, the API watches, the xtables lock)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(_MIN_CONNECTIONS, min(1024, soft // 8))


def open_listener(address: tuple[str, int]) -> socket.socket:
    """A non-blocking listening TCP socket on `address` (IPv4 or IPv6)."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # `::` and `0.0.0.0` are separate listeners
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(listen_backlog())
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Listener:
    sock: socket.socket
    handler: Handler
    paused_until: float = 0.0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)


@dataclass
class _Connection:
    sock: socket.socket
    handler: Handler
    deadline: float
    received: bytes = b""
    pending: bytes = b""
    answered: bool = False


@dataclass
class _Ops:
    """Work handed to the serving thread, and the socket pair that wakes it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    queue: list[Callable[[], None]] = field(default_factory=list)


class HttpServer:
    """One thread serving any number of listening sockets, each with its handler."""

    def __init__(
        self,
        name: str,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int | None = None,
        on_accept_error: Callable[[str], None] = lambda error: None,
    ) -> None:
        self.name = name
        self.read_timeout = read_timeout
        self.max_connections = max_connections or default_max_connections()
        self.on_accept_error = on_accept_error
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._ops = _Ops()
        self._listeners: list[Listener] = []
        self._connections: OrderedDict[int, _Connection] = OrderedDict()
        self._stopping = False
        self._warned_at = float("-inf")
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # --- from any thread

    def listen(self, address: tuple[str, int], handler: Handler) -> Listener:
        """Listen on `address` now (raising OSError if it cannot); served from then on."""
        listener = Listener(open_listener(address), handler)
        try:
            self._call(lambda: self._add(listener), start=True)
        except Exception:
            listener.sock.close()
            raise
        return listener

    @classmethod
    def serving(
        cls,
        name: str,
        address: tuple[str, int],
        handler: Handler,
        on_accept_error: Callable[[str], None],
    ) -> HttpServer:
        """A server of one listener on `address`; nothing is left running if it cannot listen."""
        server = cls(name, on_accept_error=on_accept_error)
        try:
            server.listen(address, handler)
        except OSError:
            server.close()
            raise
        return server

    def unlisten(self, listener: Listener) -> None:
        """Stop serving `listener` and close it: its port is free when this returns."""
        self._call(lambda: self._remove(listener))

    def close(self) -> None:
        """Stop the thread and close every socket."""
        self._call(self._stop)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._close_all()

    @property
    def address(self) -> tuple[str, int]:
        """Where the first listener listens (the only one of /healthz's and /metrics' servers)."""
        return self._listeners[0].address

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _call(self, op: Callable[[], None], start: bool = False) -> None:
        """Run `op` on the serving thread (starting it first if `start`) and wait for it; what
        it raises is raised here."""
        done = threading.Event()
        raised: list[Exception] = []

        def run() -> None:
            try:
                op()
            except Exception as exc:  # the caller's to handle, not the serving thread's
                raised.append(exc)
            finally:
                done.set()

        with self._start_lock:
            if start and self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
            thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            run()  # not serving (closed, or never started): nothing to race with
        else:
            with self._ops.lock:
                self._ops.queue.append(run)
            self._wake()
            done.wait(timeout=10)
        if raised:
            raise raised[0]

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe is already a wake-up
            self._wake_w.send(b"\0")

    # --- the serving thread

    def _serve(self) -> None:
        while not self._stopping:
            try:
                self._turn()
            except Exception as exc:  # e.g. ENOMEM in epoll_wait: the server must not end
                self._turn_failed(exc)
                time.sleep(ACCEPT_PAUSE)

    def _turn(self) -> None:
        events = self._selector.select(self._timeout())
        for key, mask in events:
            if key.data is None:
                self._run_ops()
            elif isinstance(key.data, Listener):
                self._accept(key.data)
            else:
                self._on_ready(key.data, mask)
        self._expire()
        self._resume_listeners()

    def _timeout(self) -> float:
        now = time.monotonic()
        moments = [c.deadline for c in self._connections.values()]
        moments += [lst.paused_until for lst in self._listeners if lst.paused_until]
        return max(0.0, min([now + 1.0, *moments]) - now)

    def _run_ops(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        with self._ops.lock:
            ops, self._ops.queue = self._ops.queue, []
        for op in ops:
            op()

    def _add(self, listener: Listener) -> None:
        self._listeners.append(listener)
        self._selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _remove(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
            if not listener.paused_until:
                self._selector.unregister(listener.sock)
        listener.sock.close()
        for fd, conn in list(self._connections.items()):
            if conn.handler is listener.handler:
                self._drop(fd)

    def _stop(self) -> None:
        self._stopping = True

    def _close_all(self) -> None:
        for listener in list(self._listeners):
            listener.sock.close()
        self._listeners.clear()
        for fd in list(self._connections):
            self._drop(fd)
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()

    def _accept(self, listener: Listener) -> None:
        # A few at a time, then the requests that came in are read: a connection just accepted
        # is not pushed out by those accepted after it before its request is read.
        for _ in range(max(1, min(64, self.max_connections // 4))):
            try:
                sock, _peer = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._out_of_descriptors(exc)
                    self._pause(listener)
                return  # ECONNABORTED and the like: that client's problem
            if len(self._connections) >= self.max_connections:
                self._drop_oldest()
            sock.setblocking(False)
            deadline = time.monotonic() + self.read_timeout
            self._connections[sock.fileno()] = _Connection(sock, listener.handler, deadline)
            self._selector.register(sock, selectors.EVENT_READ, self._connections[sock.fileno()])

    def _turn_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.error("http_server_failed", server=self.name, error=repr(exc))

    def _out_of_descriptors(self, exc: OSError) -> None:
        """Hold fewer connections from now on (half as many, within the open-file limit's share
        as it is now: it may have been lowered), so the rest of the agent has descriptors and the
        next probe can be accepted."""
        self.on_accept_error(errno.errorcode.get(exc.errno or 0, "unknown"))
        self.max_connections = max(
            _MIN_CONNECTIONS, min(default_max_connections(), len(self._connections) // 2)
        )
        while len(self._connections) > self.max_connections:
            self._drop_oldest()
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning(
                "accept_failed",
                server=self.name,
                error=str(exc),
                max_connections=self.max_connections,
                action="dropped the oldest connections; accepting again shortly",
            )

    def _pause(self, listener: Listener) -> None:
        if not listener.paused_until:
            self._selector.unregister(listener.sock)
        listener.paused_until = time.monotonic() + ACCEPT_PAUSE

    def _resume_listeners(self) -> None:
        now = time.monotonic()
        for listener in self._listeners:
            if listener.paused_until and listener.paused_until <= now:
                listener.paused_until = 0.0
                self._selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _drop_oldest(self) -> None:
        if self._connections:
            self._drop(next(iter(self._connections)))

    def _drop(self, fd: int) -> None:
        conn = self._connections.pop(fd, None)
        if conn is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, conn in list(self._connections.items()):
            if conn.deadline <= now:
                self._drop(fd)

    def _on_ready(self, conn: _Connection, mask: int) -> None:
        fd = conn.sock.fileno()
        try:
            if not conn.answered:
                self._read(conn)
            elif mask & selectors.EVENT_WRITE:
                self._write(conn)
        except OSError:
            self._drop(fd)

    def _read(self, conn: _Connection) -> None:
        data = conn.sock.recv(4096)
        if not data:
            self._drop(conn.sock.fileno())
            return
        conn.received += data
        end = conn.received.find(b"\r\n\r\n")
        if end < 0:
            end = conn.received.find(b"\n\n")
        if end < 0:
            if len(conn.received) > MAX_REQUEST:
                self._answer(conn, Response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE), False)
            return
        self._answer(conn, *self._respond(conn.handler, conn.received[:end]))

    def _respond(self, handler: Handler, head: bytes) -> tuple[Response, bool]:
        """The answer to a request head, and whether it carries a body (not for HEAD)."""
        words = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return Response(HTTPStatus.BAD_REQUEST), False
        method = words[0].decode("latin-1")
        if method not in ("GET", "HEAD"):
            return Response(HTTPStatus.METHOD_NOT_ALLOWED, headers=(("Allow", "GET, HEAD"),)), False
        path = words[1].decode("latin-1").split("?", 1)[0]
        try:
            response = handler(Request(method, path))
        except Exception as exc:  # a bug in one answer must not end the server
            log.error("http_handler_failed", server=self.name, path=path, error=repr(exc))
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR)
        return response, method == "GET"

    def _answer(self, conn: _Connection, response: Response, with_body: bool) -> None:
        reason = HTTPStatus(response.code).phrase
        lines = [
            f"HTTP/1.1 {response.code} {reason}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in response.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        conn.pending = head + (response.body if with_body else b"")
        conn.answered = True
        conn.deadline = time.monotonic() + self.read_timeout
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.pending)
        except BlockingIOError:
            return
        conn.pending = conn.pending[sent:]
        if not conn.pending:
            self._drop(conn.sock.fileno())
