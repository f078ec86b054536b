"""Loopback servers and helpers for the userspace relay tests (everything on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

LOOPBACK = "127.0.0.1"


class NoShuffle(random.Random):
    """Keeps the endpoints in sorted order, so a test knows which one round robin picks first."""

    def shuffle(self, x: list[object]) -> None:  # type: ignore[override]
        return None


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


class TcpServer:
    """mode "reply": read to EOF, answer `name:data`, close. mode "echo": echo as it comes."""

    def __init__(self, name: str, mode: str = "reply") -> None:
        self.name, self.mode = name, mode
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(128)
        self.addr: tuple[str, int] = (LOOPBACK, self.sock.getsockname()[1])
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            if self.mode == "echo":
                while data := conn.recv(65536):
                    conn.sendall(data)
                return
            chunks = []
            while data := conn.recv(65536):
                chunks.append(data)
            conn.sendall(self.name.encode() + b":" + b"".join(chunks))

    def close(self) -> None:
        self.sock.close()


def request(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send, half-close, read the whole reply."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def free_port() -> int:
    """A loopback port nothing listens on (bound then closed: connects to it are refused)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def black_hole() -> Iterator[tuple[str, int]]:
    """A loopback address whose SYNs go unanswered: a listener with a full accept queue."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    addr = listener.getsockname()
    fillers = []
    try:
        for _ in range(16):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(addr)
            fillers.append(filler)
            _, writable, _ = select.select([], [filler], [], 0.2)
            if not writable:
                break
        else:
            raise AssertionError("could not fill the accept queue")
        yield (LOOPBACK, int(addr[1]))
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


class UdpEcho:
    """Answers each datagram with `name:` + the datagram."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.bind((LOOPBACK, 0))
        self.addr: tuple[str, int] = (LOOPBACK, self.sock.getsockname()[1])
        self.peers: set[tuple[str, int]] = set()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65536)
            except OSError:
                return
            self.peers.add(peer)
            reply = data if len(data) > 60000 else self.name + b":" + data
            self.sock.sendto(reply, peer)

    def close(self) -> None:
        self.sock.close()
