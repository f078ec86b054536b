"""The userspace mode's relay: an asyncio loop in a thread of its own, driven by `sync(wanted)`.

The agent's threads call `sync`, `counters` and `stop`; everything that touches a socket runs
on the relay's loop, so the listeners, balancers and counters need no locks."""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import socket
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from kproxy.dataplane.relay.balancer import LoadBalancerRR
from kproxy.dataplane.relay.caps import CapLimits, ConnectionCaps, default_limits
from kproxy.dataplane.relay.ports import PortAllocator
from kproxy.dataplane.relay.pump import HAS_SPLICE
from kproxy.dataplane.relay.spec import (
    DIAL_TIMEOUTS,
    UDP_IDLE_TIMEOUT,
    ListenerKey,
    ListenerSpec,
    ServicePortCounters,
    SyncResult,
)
from kproxy.dataplane.relay.tcp import TcpListener, TcpOptions, family_of
from kproxy.dataplane.relay.udp import UdpListener
from kproxy.errors import DataplaneError, KproxyError
from kproxy.model.service import Protocol

Listener = TcpListener | UdpListener
SYNC_TIMEOUT = 10.0
T = TypeVar("T")


class _Running:
    """A listener together with the spec and port it was opened for."""

    def __init__(self, spec: ListenerSpec, listener: Listener, port: int, allocated: int) -> None:
        self.spec = spec
        self.listener = listener
        self.port = port
        self.allocated = allocated


class Relay:
    """Listeners per service port. `start()`, then `sync(wanted)` as often as the plan changes."""

    def __init__(
        self,
        *,
        port_range: str = "",
        udp_idle_timeout: float = UDP_IDLE_TIMEOUT,
        dial_timeouts: Sequence[float] = DIAL_TIMEOUTS,
        use_splice: bool = HAS_SPLICE,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        caps: CapLimits | None = None,
        name: str = "userspace-relay",
    ) -> None:
        if udp_idle_timeout <= 0:
            raise KproxyError("udpIdleTimeout must be greater than zero")
        self._allocator = PortAllocator(port_range, rng)
        self._udp_idle = udp_idle_timeout
        self._tcp = TcpOptions(tuple(dial_timeouts), use_splice and HAS_SPLICE)
        self._rng = rng
        self._clock = clock
        self._running: dict[ListenerKey, _Running] = {}
        self._counters: dict[ListenerKey, ServicePortCounters] = {}
        self._connections: set[asyncio.Task[None]] = set()
        # Sized from the open-file limit at start() (after raising it), unless given.
        self._limits = caps
        self._caps = ConnectionCaps(caps or CapLimits(1, 1))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._name = name  # of its thread

    # -- the agent's side (any thread) -------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        raise_open_files_limit()
        self._caps.limits = self._limits or default_limits()
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close every listener and connection, then end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(SYNC_TIMEOUT)
        loop.close()
        self._loop = self._thread = None

    def sync(self, wanted: Mapping[ListenerKey, ListenerSpec]) -> SyncResult:
        """Make the listeners match `wanted` (the complete set); returns each bound port."""
        return self._call(self._apply(dict(wanted)))

    def counters(self) -> dict[ListenerKey, dict[str, int]]:
        """A copy per service port; service ports removed keep counting their live connections."""
        return {key: c.snapshot() for key, c in list(self._counters.items())}

    def bound_ports(self) -> dict[ListenerKey, int]:
        return {key: r.port for key, r in list(self._running.items())}

    def limits(self) -> CapLimits:
        """The caps in force (meaningful once started)."""
        return self._caps.limits

    def alive(self) -> bool:
        """For health: the loop thread still runs."""
        return self._thread is not None and self._thread.is_alive()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise DataplaneError("relay is not started (call Relay.start() first)")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(SYNC_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise DataplaneError(
                f"relay loop did not answer within {SYNC_TIMEOUT:g} s (alive: {self.alive()})"
            ) from None

    # -- the loop's side ---------------------------------------------------------------------

    async def _apply(self, wanted: dict[ListenerKey, ListenerSpec]) -> SyncResult:
        result = SyncResult()
        for key in [k for k in self._running if k not in wanted]:
            self._close(key)
        for key, spec in wanted.items():
            try:
                result.ports[key] = self._ensure(key, spec)
            except KproxyError as exc:
                result.errors[key] = str(exc)
        for running in self._running.values():
            running.listener.balancer.sweep_affinity()
        # A removed service port's counters stay while its connections run, then go.
        for key in [k for k, c in self._counters.items() if k not in wanted]:
            if self._counters[key].active_connections == 0:
                result.retired[key] = self._counters.pop(key).snapshot()
        return result

    def _ensure(self, key: ListenerKey, spec: ListenerSpec) -> int:
        running = self._running.get(key)
        if running is not None and running.spec.same_listener(spec):
            # Only endpoints or affinity changed: the socket and its connections stay.
            running.listener.balancer.set_endpoints(spec.endpoints, spec.affinity_seconds)
            running.listener.endpoints_changed()
            running.spec = spec
            return running.port
        if running is not None:
            self._close(key)
        self._running[key] = self._open(key, spec)
        return self._running[key].port

    def _open(self, key: ListenerKey, spec: ListenerSpec) -> _Running:
        if spec.protocol is Protocol.SCTP:
            raise DataplaneError(f"{key}: SCTP is not supported by the userspace relay")
        allocated = self._allocator.allocate() if spec.port == 0 else 0
        try:
            sock = _bind(spec, spec.port or allocated)
        except OSError as exc:
            self._allocator.release(allocated)
            raise DataplaneError(
                f"{key}: cannot listen on {spec.bind_address}:{spec.port or allocated}"
                f"/{spec.protocol.value}: {exc.strerror or exc}"
            ) from None
        balancer = (
            LoadBalancerRR(self._rng, self._clock) if self._clock else LoadBalancerRR(self._rng)
        )
        balancer.set_endpoints(spec.endpoints, spec.affinity_seconds)
        counters = self._counters.setdefault(key, ServicePortCounters())
        listener: Listener
        if spec.protocol is Protocol.TCP:
            listener = TcpListener(
                sock, balancer, counters, self._tcp, self._connections, self._caps
            )
        else:
            listener = UdpListener(sock, balancer, counters, self._udp_idle, self._caps)
        listener.start()
        return _Running(spec, listener, int(sock.getsockname()[1]), allocated)

    def _close(self, key: ListenerKey) -> None:
        running = self._running.pop(key)
        running.listener.close()
        self._allocator.release(running.allocated)

    async def _shutdown(self) -> None:
        for key in list(self._running):
            self._close(key)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: a spliced connection holds six descriptors (two
    sockets, two pipes), so the usual soft 1024 would cap the relay near 170 connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _bind(spec: ListenerSpec, port: int) -> socket.socket:
    kind = socket.SOCK_STREAM if spec.protocol is Protocol.TCP else socket.SOCK_DGRAM
    sock = socket.socket(family_of(spec.bind_address), kind)
    try:
        sock.setblocking(False)
        if sock.family == socket.AF_INET6:
            # IPv6 only: the IPv4 portals' guard (only NATed traffic reaches a relay port) is
            # in the IPv4 tables, and knows nothing of this socket's port.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            # A restarted agent must rebind ports whose old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.bind_address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock
