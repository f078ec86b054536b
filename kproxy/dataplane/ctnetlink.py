"""A plain ctnetlink socket for UDP conntrack cleanup: dumps the kernel filters by destination,
deletes by the exact original tuple, and flushes by filter.

Plain struct code rather than pyroute2's Conntrack: pyroute2 decodes every entry of a dump into
attribute objects (about 2 ms an entry here: 14,000 flows took more than 30 s), where the
cleanup needs three fields of each. The kernel filters (CTA_FILTER) need Linux 5.8; deleting by
filter needs 6.12: an older kernel refuses it (it reads the filter's tuple as an exact one, which
it lacks fields for), and `FlushRefused` says so.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kproxy.errors import DataplaneError

NETLINK_NETFILTER = 12
IPCTNL_MSG_CT_NEW = 1 << 8  # NFNL_SUBSYS_CTNETLINK << 8 | message: how dumped entries come
IPCTNL_MSG_CT_GET = (1 << 8) | 1
IPCTNL_MSG_CT_DELETE = (1 << 8) | 2
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
BUFFER = 4 << 20
READ_SIZE = 1 << 20
DELETE_BATCH = 256  # delete messages per send (about 25 KB)
TIMEOUT = 30.0

CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ID, CTA_ZONE, CTA_FILTER = 1, 2, 12, 18, 25
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 3
CTA_FILTER_ORIG_FLAGS = 1
FILTER_IP_DST, FILTER_PROTO_NUM, FILTER_PROTO_DST_PORT = 1 << 1, 1 << 3, 1 << 5
UDP = 17
AF = {4: socket.AF_INET, 6: socket.AF_INET6}

_HEADER = struct.Struct("<IHHII")
_ATTR = struct.Struct("<HH")
_ERROR = struct.Struct("<i")
_PORT = struct.Struct(">H")


class FlushRefused(DataplaneError):
    """The kernel cannot delete by filter (before Linux 6.12)."""


@dataclass(frozen=True, slots=True)
class UdpFlow:
    dst: str
    dport: int
    reply_src: str
    ref: bytes  # the attributes that delete exactly this entry: its tuple, id and zone


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    size = 4 + len(payload)
    head = _ATTR.pack(size, kind | (NLA_F_NESTED if nested else 0))
    return head + payload + bytes(-size % 4)


def encode_filter(family: int, port: int, address: str | None) -> bytes:
    """CTA_TUPLE_ORIG and CTA_FILTER selecting UDP flows to `port` (and `address`)."""
    flags = FILTER_PROTO_NUM | FILTER_PROTO_DST_PORT
    tuple_ = b""
    if address is not None:
        flags |= FILTER_IP_DST
        dst = CTA_IP_V4_DST if family == 4 else CTA_IP_V6_DST
        tuple_ += _attr(CTA_TUPLE_IP, _attr(dst, socket.inet_pton(AF[family], address)), True)
    proto = _attr(CTA_PROTO_NUM, bytes([UDP])) + _attr(CTA_PROTO_DST_PORT, _PORT.pack(port))
    tuple_ += _attr(CTA_TUPLE_PROTO, proto, True)
    flags_attr = _attr(CTA_FILTER_ORIG_FLAGS, struct.pack("<I", flags))
    return _attr(CTA_TUPLE_ORIG, tuple_, True) + _attr(CTA_FILTER, flags_attr, True)


def _attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in buf[start:end]."""
    while start + 4 <= end:
        size, kind = _ATTR.unpack_from(buf, start)
        if size < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + size
        start += (size + 3) & ~3


def _find(buf: bytes, start: int, end: int, kind: int) -> tuple[int, int]:
    for found, a, b in _attrs(buf, start, end):
        if found == kind:
            return a, b
    return 0, 0


def decode_flow(buf: bytes, start: int, end: int, family: int) -> UdpFlow | None:
    """The flow of one dumped entry (the attributes after the nfgenmsg header); None for an
    entry that is not UDP or lacks a field."""
    orig = reply = (0, 0)
    ref = b""
    for kind, a, b in _attrs(buf, start, end):
        if kind == CTA_TUPLE_ORIG:
            orig = (a, b)
            ref += buf[a - 4 : (b + 3) & ~3]
        elif kind == CTA_TUPLE_REPLY:
            reply = (a, b)
        elif kind in (CTA_ID, CTA_ZONE):  # the id: never another flow that reused the tuple
            ref += buf[a - 4 : (b + 3) & ~3]
    af = AF[family]
    dst_kind, src_kind = (
        (CTA_IP_V4_DST, CTA_IP_V4_SRC) if family == 4 else (CTA_IP_V6_DST, CTA_IP_V6_SRC)
    )
    ip = _find(buf, *orig, CTA_TUPLE_IP)
    proto = _find(buf, *orig, CTA_TUPLE_PROTO)
    dst = _find(buf, *ip, dst_kind)
    num = _find(buf, *proto, CTA_PROTO_NUM)
    dport = _find(buf, *proto, CTA_PROTO_DST_PORT)
    src = _find(buf, *_find(buf, *reply, CTA_TUPLE_IP), src_kind)
    if not (dst[1] and num[1] and dport[1] and src[1]) or buf[num[0]] != UDP:
        return None
    return UdpFlow(
        socket.inet_ntop(af, buf[dst[0] : dst[1]]),
        _PORT.unpack_from(buf, dport[0])[0],
        socket.inet_ntop(af, buf[src[0] : src[1]]),
        ref,
    )


class CtSocket:
    """One netlink socket to the conntrack table of the current network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        for force, plain in (
            (SO_RCVBUFFORCE, socket.SO_RCVBUF),
            (SO_SNDBUFFORCE, socket.SO_SNDBUF),
        ):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, BUFFER)
            except OSError:  # without CAP_NET_ADMIN: what rmem_max allows
                self.sock.setsockopt(socket.SOL_SOCKET, plain, BUFFER)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without the request
        self.sock.settimeout(TIMEOUT)  # the kernel always answers; never wait forever
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CtSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _message(self, kind: int, flags: int, family: int, attrs: bytes) -> bytes:
        self.seq += 1
        body = struct.pack("<BBH", AF[family], 0, 0) + attrs
        return _HEADER.pack(16 + len(body), kind, NLM_F_REQUEST | flags, self.seq, 0) + body

    def _replies(self) -> Iterator[tuple[int, bytes, int, int]]:
        """(type, buffer, payload start, payload end) of each message read, until done."""
        while True:
            data = self.sock.recv(READ_SIZE)
            offset = 0
            while offset + 16 <= len(data):
                size, kind = _HEADER.unpack_from(data, offset)[:2]
                yield kind, data, offset + 16, offset + size
                if kind == NLMSG_DONE:
                    return
                offset += (size + 3) & ~3

    def dump_udp(self, family: int, port: int, address: str | None) -> Iterator[UdpFlow]:
        """The UDP flows to `port` (and `address`) that the kernel hands out: it filters them."""
        attrs = encode_filter(family, port, address)
        self.sock.send(self._message(IPCTNL_MSG_CT_GET, NLM_F_DUMP, family, attrs))
        for kind, data, start, end in self._replies():
            if kind == NLMSG_ERROR:
                _raise(_ERROR.unpack_from(data, start)[0], "conntrack dump")
                return
            if kind == IPCTNL_MSG_CT_NEW:
                flow = decode_flow(data, start + 4, end, family)
                if flow is not None:
                    yield flow

    def delete(self, family: int, refs: Iterable[bytes]) -> int:
        """Delete each entry by its exact tuple and id; how many were there to delete."""
        deleted = 0
        batch: list[bytes] = []
        for ref in refs:
            batch.append(self._message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, family, ref))
            if len(batch) == DELETE_BATCH:
                deleted += self._send_batch(batch)
                batch = []
        return deleted + (self._send_batch(batch) if batch else 0)

    def _send_batch(self, batch: list[bytes]) -> int:
        self.sock.send(b"".join(batch))
        deleted = owed = len(batch)
        while owed:
            data = self.sock.recv(READ_SIZE)
            offset = 0
            while offset + 16 <= len(data):
                size, kind = _HEADER.unpack_from(data, offset)[:2]
                if kind == NLMSG_ERROR:
                    owed -= 1
                    code = _ERROR.unpack_from(data, offset + 16)[0]
                    if code == -errno.ENOENT:  # gone meanwhile (timed out, or replaced)
                        deleted -= 1
                    elif code:
                        _raise(code, "conntrack delete")
                offset += (size + 3) & ~3
        return deleted

    def flush_udp(self, family: int, port: int, address: str | None) -> None:
        """Let the kernel delete every UDP flow to `port` (and `address`) of `family`."""
        attrs = encode_filter(family, port, address)
        self.sock.send(self._message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, family, attrs))
        for kind, data, start, _ in self._replies():
            if kind == NLMSG_ERROR:
                code = _ERROR.unpack_from(data, start)[0]
                # An older kernel takes the filter's tuple for an exact one: EINVAL (fields
                # missing) or ENOENT; a kernel that filters answers 0 even when none matched.
                if code in (-errno.EINVAL, -errno.EOPNOTSUPP, -errno.ENOENT):
                    raise FlushRefused(f"conntrack flush by filter: {os.strerror(-code)}")
                _raise(code, "conntrack flush")
                return


def _raise(code: int, what: str) -> None:
    if code:
        raise DataplaneError(f"{what} failed: {os.strerror(-code)}")
