"""kproxy's HTTP server on loopback: one thread however many connections, a read timeout for
half-sent requests, a cap that drops the oldest connection rather than refusing the newest, the
node's somaxconn as backlog, and answers that survive a handler's bug."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from kproxy.health.http import HttpServer, Request, Response, json_response, listen_backlog


def hello(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("a bug")
    return json_response(200, {"path": request.path})


@pytest.fixture
def server() -> Iterator[HttpServer]:
    built = HttpServer("test", read_timeout=0.3, max_connections=4)
    built.listen(("127.0.0.1", 0), hello)
    yield built
    built.close()


def exchange(server: HttpServer, data: bytes) -> bytes:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


def closed_by_server(sock: socket.socket) -> bool:
    """A FIN, or a reset (a close with the request unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_answers_get_with_json_and_closes(server: HttpServer) -> None:
    answer = exchange(server, b"GET /livez?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b'{"path": "/livez"}'
    assert b"Connection: close" in head and f"Content-Length: {len(body)}".encode() in head


def test_head_has_no_body_and_other_methods_are_refused(server: HttpServer) -> None:
    head = exchange(server, b"HEAD /x HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
    post = exchange(server, b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post
    assert exchange(server, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    too_long = b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 9000 + b"\r\n"
    assert exchange(server, too_long).startswith(b"HTTP/1.1 431 ")


def test_a_handler_bug_is_a_500_and_the_server_goes_on(server: HttpServer) -> None:
    assert exchange(server, b"GET /boom HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500 ")
    assert exchange(server, b"GET /ok HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def test_a_half_sent_request_is_closed_after_the_read_timeout(server: HttpServer) -> None:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: a\r\n")
        assert sock.recv(4096) == b""  # closed by the server (a TimeoutError if never)


def test_idle_connections_beyond_the_cap_push_out_the_oldest_not_the_newest(
    server: HttpServer,
) -> None:
    before = threading.active_count()
    idle = [socket.create_connection(server.address, timeout=10) for _ in range(20)]
    try:
        for sock in idle:
            sock.sendall(b"GET /")
        answer = exchange(server, b"GET /livez HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert threading.active_count() == before
        assert closed_by_server(idle[0])  # the oldest was dropped
    finally:
        for sock in idle:
            sock.close()


def test_listens_with_the_nodes_somaxconn_backlog(server: HttpServer) -> None:
    port = server.address[1]
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    # For a listening socket, ss's Send-Q column is the backlog it was given.
    assert int(out.split()[2]) == listen_backlog() > 5, out


def test_a_port_is_free_again_once_unlistened() -> None:
    built = HttpServer("test")
    try:
        listener = built.listen(("127.0.0.1", 0), hello)
        port = listener.address[1]
        built.unlisten(listener)
        again = built.listen(("127.0.0.1", port), hello)
        assert again.address[1] == port
    finally:
        built.close()


# A server in a process of its own whose open-file limit is 64: the test holds more connections
# than that, then asks once more; the server reports its accept errors on stdout.
_LOW_LIMIT_SERVER = """
import resource, sys, time
from kproxy.health.http import HttpServer, json_response
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
errors = []
server = HttpServer("low", max_connections=1000, on_accept_error=errors.append)
server.listen(("127.0.0.1", 0), lambda request: json_response(200, {"errors": len(errors)}))
print(server.address[1], flush=True)
sys.stdin.readline()
print(len(errors), server.max_connections, server.alive, flush=True)
"""


def test_out_of_descriptors_in_accept_drops_the_oldest_and_keeps_answering() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOW_LIMIT_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    idle: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        answer = b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        proc.stdin.write("\n")
        proc.stdin.flush()
        while len(words := proc.stdout.readline().split()) != 3:
            pass  # the server's own log lines come first
        errors, cap, alive = words
        assert int(errors) >= 1 and int(cap) < 64 and alive == "True"
    finally:
        for sock in idle:
            sock.close()
        proc.kill()
        proc.wait()
