"""TCP service ports: accept, dial an endpoint with upstream's retries, relay both ways."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kproxy.dataplane.relay.balancer import EndpointAddr, LoadBalancerRR, NoEndpointsError
from kproxy.dataplane.relay.caps import ConnectionCaps
from kproxy.dataplane.relay.pump import Count, copy_pump, splice_pump
from kproxy.dataplane.relay.shortage import SHORTAGE
from kproxy.dataplane.relay.spec import ServicePortCounters

ACCEPT_BATCH = 64
ACCEPT_BACKOFF = 0.05


@dataclass(frozen=True)
class TcpOptions:
    dial_timeouts: Sequence[float]
    use_splice: bool


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def reset_close(sock: socket.socket) -> None:
    """Close with RST (linger 0): the peer sees a reset at once, never a hang or a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _pick(
    balancer: LoadBalancerRR, client_ip: str, reset: bool, failed: set[EndpointAddr]
) -> EndpointAddr:
    """The next endpoint, skipping ones this dial already failed on while others remain.

    Other connections advance the same rotation, so upstream's plain "next" can hand a retry
    the endpoint that just failed; trying each endpoint before repeating one is what the
    retry is for."""
    endpoint = balancer.next_endpoint(client_ip, reset=reset)
    for _ in range(len(balancer.endpoints)):
        if endpoint not in failed:
            break
        endpoint = balancer.next_endpoint(client_ip, reset=True)
    return endpoint


async def connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, endpoint: EndpointAddr, timeout: float
) -> None:
    """A non-blocking connect that fails with OSError, or TimeoutError after `timeout` seconds:
    one future and one timer (asyncio.wait_for would add a task per dial)."""
    try:
        sock.connect(endpoint)
        return
    except BlockingIOError:
        pass  # EINPROGRESS: the handshake goes on
    fd = sock.fileno()
    done: asyncio.Future[None] = loop.create_future()

    def finish(error: BaseException | None) -> None:
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    loop.add_writer(fd, finish, None)
    timer = loop.call_later(timeout, finish, TimeoutError(f"connect to {endpoint} timed out"))
    try:
        await done
    finally:
        loop.remove_writer(fd)
        timer.cancel()
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def dial_endpoint(
    balancer: LoadBalancerRR,
    client_ip: str,
    options: TcpOptions,
    counters: ServicePortCounters,
) -> socket.socket | None:
    """A connected socket to an endpoint, or None when there is none, every attempt failed, or
    the kernel gave no socket (EMFILE: counted and logged by SHORTAGE).

    A refusal fails at once and the next endpoint is tried; a silent endpoint costs one timeout."""
    loop = asyncio.get_running_loop()
    failed: set[EndpointAddr] = set()
    for attempt, timeout in enumerate(options.dial_timeouts):
        try:
            endpoint = _pick(balancer, client_ip, attempt > 0, failed)
        except NoEndpointsError:
            counters.no_endpoint_rejects += 1
            return None
        sock = SHORTAGE.open(family_of(endpoint[0]), socket.SOCK_STREAM, counters)
        if sock is None:
            return None
        try:
            await connect(loop, sock, endpoint, timeout)
        except (OSError, TimeoutError):
            sock.close()
            counters.dial_failures += 1
            failed.add(endpoint)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    return None


async def relay_connection(
    client: socket.socket,
    backend: socket.socket,
    counters: ServicePortCounters,
    use_splice: bool,
) -> None:
    """Both directions until both reached EOF; an error in either resets both sides.

    Half-close is propagated (one side's EOF becomes SHUT_WR on the other), which upstream
    did not do: a client that shuts down writing still gets its reply."""
    pump = splice_pump if use_splice else copy_pump

    def to_endpoint(n: int) -> None:
        counters.bytes_to_endpoint += n

    def to_client(n: int) -> None:
        counters.bytes_to_client += n

    async def direction(src: socket.socket, dst: socket.socket, count: Count) -> None:
        await pump(src, dst, count)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    for sock in (client, backend):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(direction(client, backend, to_endpoint))
            group.create_task(direction(backend, client, to_client))
    except* OSError:
        reset_close(client)
        reset_close(backend)
    finally:
        client.close()
        backend.close()


class TcpListener:
    """One listening socket; every accepted connection is served by a task of its own, so a slow
    dial never holds up the next accept (upstream dialled inside its accept loop)."""

    def __init__(
        self,
        sock: socket.socket,
        balancer: LoadBalancerRR,
        counters: ServicePortCounters,
        options: TcpOptions,
        connections: set[asyncio.Task[None]],
        caps: ConnectionCaps,
    ) -> None:
        self.sock = sock
        self.balancer = balancer
        self.counters = counters
        self._options = options
        self._caps = caps
        # Owned by the relay, not by this listener: connections outlive a closed listener.
        self._connections = connections
        self._backoff: asyncio.TimerHandle | None = None

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_acceptable)

    def endpoints_changed(self) -> None:
        """Nothing to do: a connection finds the balancer empty and is reset at once."""

    def close(self) -> None:
        if self._backoff is not None:
            self._backoff.cancel()
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def _on_acceptable(self) -> None:
        """Accept what is queued (a bounded batch per wakeup), a task per connection."""
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # EMFILE and friends: back off briefly instead of exiting as upstream did.
                SHORTAGE.failed(exc, self.counters)
                loop.remove_reader(self.sock.fileno())
                self._backoff = loop.call_later(ACCEPT_BACKOFF, self._resume)
                return
            if not self._caps.admit(self.counters):
                reset_close(conn)  # at a cap: the client sees a reset at once
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn, str(addr[0])))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
            # In a callback, not in _serve: a task cancelled before it ran still gives back.
            task.add_done_callback(functools.partial(self._served, conn))

    def _served(self, conn: socket.socket, _task: asyncio.Task[None]) -> None:
        conn.close()
        self._caps.release(self.counters)

    def _resume(self) -> None:
        self._backoff = None
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_acceptable)

    async def _serve(self, conn: socket.socket, client_ip: str) -> None:
        counters = self.counters
        counters.connections_total += 1
        backend = await dial_endpoint(self.balancer, client_ip, self._options, counters)
        if backend is None:
            reset_close(conn)
            return
        await relay_connection(conn, backend, counters, self._options.use_splice)
