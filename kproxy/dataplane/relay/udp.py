"""UDP service ports: one socket per service port, one connected socket per client address."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from kproxy.dataplane.relay.balancer import LoadBalancerRR, NoEndpointsError
from kproxy.dataplane.relay.caps import ConnectionCaps
from kproxy.dataplane.relay.shortage import SHORTAGE
from kproxy.dataplane.relay.spec import ServicePortCounters

# Larger than any datagram (65507 bytes of IPv4 payload, 65527 of IPv6): nothing is truncated.
DATAGRAM_MAX = 65536
SOCKET_BUFFER = 1 << 22
# Datagrams read per wakeup, so one busy client does not starve the loop's other work.
BATCH = 64

ClientAddr = tuple[str, int]
# Linux's value: not every Python's socket module names it (IPV6_PKTINFO it does).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
# Room for one in_pktinfo (12 bytes) or in6_pktinfo (20 bytes).
PKTINFO_SPACE = socket.CMSG_SPACE(20)


def size_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


def receive_destinations(sock: socket.socket) -> None:
    """Have each datagram say which address it was sent to (after the portal's NAT)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def destination_of(ancillary: list[tuple[int, int, bytes]]) -> bytes | None:
    """The packed address a datagram was sent to, from its pktinfo; None if absent."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return data[8:12]  # in_pktinfo: ifindex, spec_dst, addr (the header's destination)
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
            return data[:16]  # in6_pktinfo: addr, ifindex
    return None


def source_option(local: bytes) -> tuple[int, int, bytes]:
    """The ancillary item that sends a datagram from `local`, whatever the route would pick."""
    if len(local) == 16:
        return (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, local + struct.pack("=i", 0))
    return (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, local, bytes(4)))


class _Mapping:
    """One client's flow to one endpoint; it ends after the idle timeout without traffic."""

    def __init__(self, owner: UdpListener, client: ClientAddr, backend: socket.socket) -> None:
        self._owner = owner
        self.client = client
        self.backend = backend
        # The node address the client's datagrams were NATed to: replies leave from it.
        self.local: bytes | None = None
        self._loop = asyncio.get_running_loop()
        self.last_active = self._loop.time()
        self._timer = self._loop.call_later(owner.idle_timeout, self._check_idle)
        self._loop.add_reader(backend.fileno(), self._on_reply)

    def touch(self) -> None:
        self.last_active = self._loop.time()

    def _check_idle(self) -> None:
        # Rearm lazily instead of rescheduling on every datagram: one timer per idle period.
        left = self.last_active + self._owner.idle_timeout - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._check_idle)
        else:
            self._owner.drop_mapping(self)

    def _on_reply(self) -> None:
        for _ in range(BATCH):
            try:
                data = self.backend.recv(DATAGRAM_MAX)
            except BlockingIOError:
                return
            except OSError:
                # ICMP port unreachable and the like: the next datagram starts afresh.
                self._owner.drop_mapping(self)
                return
            self.touch()
            self._owner.send_to_client(data, self.client, self.local)

    def close(self) -> None:
        if self.backend.fileno() < 0:
            return
        self._timer.cancel()
        self._loop.remove_reader(self.backend.fileno())
        self.backend.close()


class UdpListener:
    """Replies leave from the service socket, so the client's NAT reverses them to VIP:port,
    and from the address the client's datagram was NATed to: a socket bound to the wildcard
    would otherwise pick the route's source address (a bridge's, for a pod behind it), which
    is not the address in the flow's NAT, so the client would never see the reply.

    Without endpoints the service socket is connected to its own address: the kernel then
    delivers no client's datagram to it and answers each with ICMP port unreachable, which the
    client's NAT reverses, so a UDP client is refused at once, as by the iptables mode's REJECT,
    while the port stays bound. Endpoints coming back rebind a fresh socket on the same port."""

    def __init__(
        self,
        sock: socket.socket,
        balancer: LoadBalancerRR,
        counters: ServicePortCounters,
        idle_timeout: float,
        caps: ConnectionCaps,
    ) -> None:
        self.sock = sock
        self.balancer = balancer
        self.counters = counters
        self.idle_timeout = idle_timeout
        self._caps = caps
        self._mappings: dict[ClientAddr, _Mapping] = {}
        self._bound: tuple[str, int] = tuple(sock.getsockname()[:2])  # before any connect
        self._refusing = False

    def start(self) -> None:
        size_buffers(self.sock)
        receive_destinations(self.sock)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_datagram)
        self.endpoints_changed()

    def endpoints_changed(self) -> None:
        """After the balancer's endpoints changed: refuse while there are none."""
        empty = not self.balancer.endpoints
        if empty and not self._refusing:
            host, port = self._bound
            if host in ("0.0.0.0", "::"):
                host = "::1" if self.sock.family == socket.AF_INET6 else "127.0.0.1"
            with contextlib.suppress(OSError):
                self.sock.connect((host, port))
                self._refusing = True
        elif not empty and self._refusing:
            self._rebind()

    def _rebind(self) -> None:
        loop = asyncio.get_running_loop()
        fresh = SHORTAGE.open(self.sock.family, socket.SOCK_DGRAM, self.counters)
        if fresh is None:
            return  # still refusing, on the old socket: the next sync tries again
        self._forget_socket()
        try:
            fresh.bind(self._bound)
        except OSError:  # taken in between: the listener refuses until the next sync
            fresh.close()
            self.sock = fresh  # closed: the next rebind or close() has nothing to undo
            return
        size_buffers(fresh)
        receive_destinations(fresh)
        self.sock = fresh
        self._refusing = False
        loop.add_reader(fresh.fileno(), self._on_datagram)

    def close(self) -> None:
        # As upstream: closing the service socket ends every client mapping at once.
        for mapping in list(self._mappings.values()):
            self.drop_mapping(mapping)
        self._forget_socket()

    def _forget_socket(self) -> None:
        if self.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def _on_datagram(self) -> None:
        for _ in range(BATCH):
            try:
                data, ancillary, _flags, addr = self.sock.recvmsg(DATAGRAM_MAX, PKTINFO_SPACE)
            except BlockingIOError:
                return
            except OSError:
                continue
            client = (str(addr[0]), int(addr[1]))
            self._forward(data, client, destination_of(ancillary))

    def _forward(self, data: bytes, client: ClientAddr, local: bytes | None) -> None:
        mapping = self._mappings.get(client) or self._open_mapping(client)
        if mapping is None:
            self.counters.udp_datagrams_dropped += 1
            return
        mapping.local = local
        try:
            mapping.backend.send(data)
        except OSError:
            self.counters.udp_datagrams_dropped += 1
            return
        mapping.touch()
        self.counters.bytes_to_endpoint += len(data)

    def _open_mapping(self, client: ClientAddr) -> _Mapping | None:
        try:
            endpoint = self.balancer.next_endpoint(client[0])
        except NoEndpointsError:
            self.counters.no_endpoint_rejects += 1
            return None
        if not self._caps.admit(self.counters):
            return None  # at a cap: this datagram is dropped, one after a mapping ends passes
        family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
        backend = SHORTAGE.open(family, socket.SOCK_DGRAM, self.counters)
        if backend is None:
            self._caps.release(self.counters)
            return None  # EMFILE and the like: this datagram is dropped, the next may pass
        size_buffers(backend)
        try:
            backend.connect(endpoint)
        except OSError:
            backend.close()
            self._caps.release(self.counters)
            self.counters.dial_failures += 1
            return None
        mapping = _Mapping(self, client, backend)
        self._mappings[client] = mapping
        self.counters.udp_mappings += 1
        return mapping

    def drop_mapping(self, mapping: _Mapping) -> None:
        if self._mappings.get(mapping.client) is mapping:
            del self._mappings[mapping.client]
            self._caps.release(self.counters)
        mapping.close()

    def send_to_client(self, data: bytes, client: ClientAddr, local: bytes | None) -> None:
        try:
            if local is None:
                self.sock.sendto(data, client)
            else:
                self.sock.sendmsg([data], [source_option(local)], 0, client)
        except OSError:
            # A full socket buffer drops the reply, as the network would.
            self.counters.udp_datagrams_dropped += 1
            return
        self.counters.bytes_to_client += len(data)
