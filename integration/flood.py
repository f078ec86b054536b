"""A hostile neighbour for the integration tests: open many TCP connections to HOST:PORT, send
each half a request (no blank line ends it), and hold them until killed.

    python integration/flood.py HOST PORT COUNT

Run it in another network namespace (a host off the node). It raises its own open-file limit
(only this process's), connects without blocking, and prints one line once every connection has
been answered or given up on: `connected N failed M`. Then, until SIGTERM, it keeps COUNT
connections: every second it opens again those the server closed, and prints `open N reopened M`.
"""

from __future__ import annotations

import errno
import resource
import selectors
import signal
import socket
import sys
import time

HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: node\r\n"
CONNECT_SECONDS = 30.0


def raise_open_file_limit(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, count + 64))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def connect_all(
    host: str, port: int, count: int, seconds: float = CONNECT_SECONDS
) -> tuple[list[socket.socket], int]:
    """`count` connections started at once; those connected within `seconds`, and how many
    failed."""
    selector = selectors.DefaultSelector()
    failed = 0
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            failed += 1
            continue
        selector.register(sock, selectors.EVENT_WRITE)
    connected: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            sock = key.fileobj  # type: ignore[assignment]
            selector.unregister(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                try:
                    sock.send(HALF_REQUEST)
                    connected.append(sock)
                    continue
                except OSError:
                    pass
            sock.close()
            failed += 1
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
        failed += 1
    return connected, failed


def still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def main() -> None:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    raise_open_file_limit(count)
    connected, failed = connect_all(host, port, count)
    print(f"connected {len(connected)} failed {failed}", flush=True)
    while True:
        time.sleep(1.0)
        closed = [s for s in connected if not still_open(s)]
        for sock in closed:
            sock.close()
        connected = [s for s in connected if s.fileno() >= 0]
        again, _ = connect_all(host, port, len(closed), seconds=2.0)
        connected += again
        print(f"open {len(connected)} reopened {len(again)}", flush=True)


if __name__ == "__main__":
    main()
