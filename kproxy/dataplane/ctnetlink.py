"""A ctnetlink socket for UDP conntrack cleanup: dumps the kernel filters by destination,
deletes by the exact original tuple, and flushes by filter.

pyroute2 encodes every request, with its conntrack message class (`nfct_msg` of
`pyroute2.netlink.nfnetlink.nfctsocket`, which defines CTA_FILTER): the filtered dump and the
flush by filter in one go each, and a delete as pyroute2's encoding of a tuple with the flow's
values spliced in (`Spliced`, as the nftables dataplane does; one template per family and zone
shape, pyroute2 encodes it once; the 20 bytes of headers around it are packed plainly, as
nftables/netlink.py does). The socket is a plain AF_NETLINK one, and the few fields the
cleanup needs of each dumped entry (destination, port, protocol, the reply's source, the id and
zone) are read from the bytes by plain code: pyroute2's Conntrack decodes every entry into
attribute objects, about 2 ms an entry here (14,000 flows took more than 30 s).

The kernel filters (CTA_FILTER) need Linux 5.8; deleting by filter needs 6.12: an older kernel
refuses it (it reads the filter's tuple as an exact one, which it lacks fields for), and
`FlushRefused` says so. The kernel's IPv6 address filter is inverted (measured on 6.18: a dump
filtered on an IPv6 destination hands out the flows to every other address), so IPv6 requests
filter on protocol and port alone and plan/conntrack.py compares the addresses.

`dump` hands out the raw entries of any filtered dump: ctflows.py reads every flow of a protocol
from it for `kproxy connections`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    nfct_msg,
)

from kproxy.dataplane.nftables.templates import Spliced, spliced
from kproxy.errors import DataplaneError

NETLINK_NETFILTER = 12
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW  # how dumped entries come
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_TYPE_MASK = 0x3FFF
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
BUFFER = 4 << 20
READ_SIZE = 1 << 20
DELETE_BATCH = 256  # delete messages per send (about 25 KB)
TIMEOUT = 30.0

# Attribute numbers, as the kernel dumps them (the order of pyroute2's nla maps).
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ID, CTA_ZONE = 1, 2, 12, 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
FILTER_IP_DST, FILTER_PROTO_NUM, FILTER_PROTO_DST_PORT = 1 << 1, 1 << 3, 1 << 5
UDP = 17
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
ADDRESS = {4: ("CTA_IP_V4_SRC", "CTA_IP_V4_DST"), 6: ("CTA_IP_V6_SRC", "CTA_IP_V6_DST")}
SIZE = {4: 4, 6: 16}

_HEADER = struct.Struct("<IHHII")
_NFGEN_HEADER = 20  # nlmsghdr (16 bytes) and nfgenmsg (4)
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


def encode_request(
    kind: int, flags: int, seq: int, family: int, attrs: list[tuple[str, Any]]
) -> bytes:
    """One whole request, as pyroute2's conntrack message class encodes it."""
    msg = nfct_msg()
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST | flags
    msg["header"]["sequence_number"] = seq
    msg["nfgen_family"] = AF[family]
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def filter_attrs(family: int, port: int, address: str | None) -> list[tuple[str, Any]]:
    """CTA_TUPLE_ORIG and CTA_FILTER selecting UDP flows to `port` (and `address`)."""
    flags = FILTER_PROTO_NUM | FILTER_PROTO_DST_PORT
    tuple_: list[tuple[str, Any]] = []
    if address is not None:
        flags |= FILTER_IP_DST
        tuple_.append(("CTA_TUPLE_IP", {"attrs": [(ADDRESS[family][1], address)]}))
    proto = [("CTA_PROTO_NUM", UDP), ("CTA_PROTO_DST_PORT", port)]
    tuple_.append(("CTA_TUPLE_PROTO", {"attrs": proto}))
    return [
        ("CTA_TUPLE_ORIG", {"attrs": tuple_}),
        ("CTA_FILTER", {"attrs": [("CTA_FILTER_ORIG_FLAGS", flags)]}),
    ]


def delete_attrs(
    family: int, src: bytes, dst: bytes, sport: bytes, dport: bytes, *ids: bytes
) -> bytes:
    """pyroute2's encoding of a delete's attributes: the original tuple, the id (and zone)."""
    af = AF[family]
    ip = [
        (ADDRESS[family][0], socket.inet_ntop(af, src)),
        (ADDRESS[family][1], socket.inet_ntop(af, dst)),
    ]
    proto = [
        ("CTA_PROTO_NUM", UDP),
        ("CTA_PROTO_SRC_PORT", int.from_bytes(sport, "big")),
        ("CTA_PROTO_DST_PORT", int.from_bytes(dport, "big")),
    ]
    tuple_ = [("CTA_TUPLE_IP", {"attrs": ip}), ("CTA_TUPLE_PROTO", {"attrs": proto})]
    attrs: list[tuple[str, Any]] = [("CTA_TUPLE_ORIG", {"attrs": tuple_})]
    attrs.append(("CTA_ID", int.from_bytes(ids[0], "big")))
    if len(ids) > 1:
        attrs.append(("CTA_ZONE", int.from_bytes(ids[1], "big")))
    return encode_request(CT_DELETE, 0, 0, family, attrs)[_NFGEN_HEADER:]


@cache
def delete_template(family: int, zoned: bool) -> Spliced:
    """A delete's attributes with the source, destination, ports, id (and zone) cut out."""
    size = SIZE[family]
    sizes = (size, size, 2, 2, 4, *((2,) if zoned else ()))
    return spliced(lambda *values: delete_attrs(family, *values), *sizes)


def _attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in buf[start:end]."""
    while start + 4 <= end:
        size, kind = _ATTR.unpack_from(buf, start)
        if size < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + size
        start += (size + 3) & ~3


def _find(buf: bytes, start: int, end: int, kind: int) -> bytes:
    for found, a, b in _attrs(buf, start, end):
        if found == kind:
            return buf[a:b]
    return b""


def _span(buf: bytes, start: int, end: int, kind: int) -> tuple[int, int]:
    for found, a, b in _attrs(buf, start, end):
        if found == kind:
            return a, b
    return 0, 0


def decode_flow(buf: bytes, start: int, end: int, family: int) -> UdpFlow | None:
    """The flow of one dumped entry (the attributes after the nfgenmsg header), read without
    decoding the rest; None for an entry that is not UDP or lacks a field."""
    orig = reply = (0, 0)
    id_ = zone = b""
    for kind, a, b in _attrs(buf, start, end):
        if kind == CTA_TUPLE_ORIG:
            orig = (a, b)
        elif kind == CTA_TUPLE_REPLY:
            reply = (a, b)
        elif kind == CTA_ID:  # the id: never another flow that reused the tuple
            id_ = buf[a:b]
        elif kind == CTA_ZONE:
            zone = buf[a:b]
    src_kind, dst_kind = (
        (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == 4 else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    )
    ip = _span(buf, *orig, CTA_TUPLE_IP)
    proto = _span(buf, *orig, CTA_TUPLE_PROTO)
    src, dst = _find(buf, *ip, src_kind), _find(buf, *ip, dst_kind)
    num = _find(buf, *proto, CTA_PROTO_NUM)
    sport, dport = _find(buf, *proto, CTA_PROTO_SRC_PORT), _find(buf, *proto, CTA_PROTO_DST_PORT)
    reply_src = _find(buf, *_span(buf, *reply, CTA_TUPLE_IP), src_kind)
    size = SIZE[family]
    fields = (src, dst, reply_src, sport, dport, id_, *((zone,) if zone else ()))
    sizes = (size, size, size, 2, 2, 4, 2)[: len(fields)]
    if num != bytes([UDP]) or any(len(f) != n for f, n in zip(fields, sizes, strict=True)):
        return None
    af = AF[family]
    return UdpFlow(
        socket.inet_ntop(af, dst),
        _PORT.unpack(dport)[0],
        socket.inet_ntop(af, reply_src),
        delete_template(family, bool(zone)).fill(src, dst, sport, dport, id_, *fields[6:]),
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

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _delete_message(self, family: int, ref: bytes) -> bytes:
        """A delete of one entry: netlink's framing around the attributes pyroute2 encoded."""
        body = struct.pack("<BBH", AF[family], 0, 0) + ref
        flags = NLM_F_REQUEST | NLM_F_ACK
        return _HEADER.pack(16 + len(body), CT_DELETE, flags, self._next_seq(), 0) + body

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

    def dump(self, family: int, attrs: list[tuple[str, Any]]) -> Iterator[tuple[bytes, int, int]]:
        """(buffer, start, end) of each entry's attributes that a dump filtered by `attrs`
        hands out."""
        self.sock.send(encode_request(CT_GET, NLM_F_DUMP, self._next_seq(), family, attrs))
        for kind, data, start, end in self._replies():
            if kind == NLMSG_ERROR:
                _raise(_ERROR.unpack_from(data, start)[0], "conntrack dump")
                return
            if kind == CT_NEW:
                yield data, start + 4, end  # after the nfgenmsg header

    def dump_udp(self, family: int, port: int, address: str | None) -> Iterator[UdpFlow]:
        """The UDP flows to `port` (and `address`) that the kernel hands out: it filters them."""
        for data, start, end in self.dump(family, filter_attrs(family, port, address)):
            flow = decode_flow(data, start, end, family)
            if flow is not None:
                yield flow

    def delete(self, family: int, refs: Iterable[bytes]) -> int:
        """Delete each entry by its exact tuple and id; how many were there to delete."""
        deleted = 0
        batch: list[bytes] = []
        for ref in refs:
            batch.append(self._delete_message(family, ref))
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
        attrs = filter_attrs(family, port, address)
        self.sock.send(encode_request(CT_DELETE, NLM_F_ACK, self._next_seq(), family, attrs))
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
