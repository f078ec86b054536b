"""Every conntrack flow of one protocol, for `kproxy connections`: the kernel filters the dump
by protocol (CTA_FILTER, Linux 5.8), and each entry's tuples, state, timeout, id (and start
timestamp, when nf_conntrack_timestamp is on) are read from the bytes by plain code, as
ctnetlink.py reads the UDP cleanup's fields."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from kproxy.dataplane.ctnetlink import (
    AF,
    CTA_ID,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_SRC_PORT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    FILTER_PROTO_NUM,
    NLA_TYPE_MASK,
    SIZE,
    CtSocket,
    _attrs,
    _find,
    _span,
)

CTA_STATUS, CTA_PROTOINFO, CTA_TIMEOUT, CTA_TIMESTAMP = 3, 4, 7, 20
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE, CTA_TIMESTAMP_START = 1, 1, 1
IPS_SEEN_REPLY, IPS_ASSURED = 1 << 1, 1 << 2
TCP, SCTP = 6, 132
# The kernel's TCP conntrack states, by number (enum tcp_conntrack).
TCP_STATES = (
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
)
_PORT = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_TYPE = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class Flow:
    """One conntrack entry as `kproxy connections` shows it: the original direction (client ->
    destination) and the reply's source (where the connection really went, after any DNAT)."""

    protocol: int  # IP protocol number
    src: str
    sport: int
    dst: str
    dport: int
    reply_src: str
    reply_sport: int
    state: str  # TCP: the conntrack state; else ASSURED, REPLIED or UNREPLIED
    timeout: int  # seconds left
    age: float | None  # seconds since it began; None without nf_conntrack_timestamp
    id: int


def protocol_filter_attrs(protocol: int) -> list[tuple[str, Any]]:
    """CTA_TUPLE_ORIG and CTA_FILTER selecting every flow of one IP protocol."""
    proto = {"attrs": [("CTA_TUPLE_PROTO", {"attrs": [("CTA_PROTO_NUM", protocol)]})]}
    return [
        ("CTA_TUPLE_ORIG", proto),
        ("CTA_FILTER", {"attrs": [("CTA_FILTER_ORIG_FLAGS", FILTER_PROTO_NUM)]}),
    ]


def _tuple(buf: bytes, span: tuple[int, int], family: int) -> tuple[bytes, bytes, bytes, bytes]:
    """(source, destination, source port, destination port) of one tuple, as bytes."""
    src_kind, dst_kind = (
        (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == 4 else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    )
    ip = _span(buf, *span, CTA_TUPLE_IP)
    proto = _span(buf, *span, CTA_TUPLE_PROTO)
    return (
        _find(buf, *ip, src_kind),
        _find(buf, *ip, dst_kind),
        _find(buf, *proto, CTA_PROTO_SRC_PORT),
        _find(buf, *proto, CTA_PROTO_DST_PORT),
    )


def _state(protocol: int, status: int, protoinfo: bytes) -> str:
    if protocol == TCP and len(protoinfo) == 1 and protoinfo[0] < len(TCP_STATES):
        return TCP_STATES[protoinfo[0]]
    if status & IPS_ASSURED:
        return "ASSURED"
    return "REPLIED" if status & IPS_SEEN_REPLY else "UNREPLIED"


def decode_full_flow(
    buf: bytes, start: int, end: int, family: int, protocol: int, now_ns: int
) -> Flow | None:
    """The `Flow` of one dumped entry of `protocol` (the attributes after the nfgenmsg header);
    None for an entry lacking a field. `now_ns` is the wall clock the kernel's start
    timestamps count on."""
    orig = reply = (0, 0)
    fields: dict[int, bytes] = {}
    for kind, a, b in _attrs(buf, start, end):
        if kind == CTA_TUPLE_ORIG:
            orig = (a, b)
        elif kind == CTA_TUPLE_REPLY:
            reply = (a, b)
        elif kind == CTA_PROTOINFO:
            tcp = _span(buf, a, b, CTA_PROTOINFO_TCP)
            fields[kind] = _find(buf, *tcp, CTA_PROTOINFO_TCP_STATE)
        elif kind == CTA_TIMESTAMP:
            fields[kind] = _find(buf, a, b, CTA_TIMESTAMP_START)
        elif kind in (CTA_STATUS, CTA_TIMEOUT, CTA_ID):
            fields[kind] = buf[a:b]
    src, dst, sport, dport = _tuple(buf, orig, family)
    reply_src, _, reply_sport, _ = _tuple(buf, reply, family)
    size = SIZE[family]
    addresses, ports = (src, dst, reply_src), (sport, dport, reply_sport)
    numbers = [fields.get(k, b"") for k in (CTA_STATUS, CTA_TIMEOUT, CTA_ID)]
    if (
        any(len(a) != size for a in addresses)
        or any(len(p) != 2 for p in ports)
        or any(len(n) != 4 for n in numbers)
    ):
        return None
    af = AF[family]
    stamp = fields.get(CTA_TIMESTAMP, b"")
    age = (now_ns - _U64.unpack(stamp)[0]) / 1e9 if len(stamp) == 8 else None
    status, timeout, id_ = (_U32.unpack(n)[0] for n in numbers)
    return Flow(
        protocol,
        socket.inet_ntop(af, src),
        _PORT.unpack(sport)[0],
        socket.inet_ntop(af, dst),
        _PORT.unpack(dport)[0],
        socket.inet_ntop(af, reply_src),
        _PORT.unpack(reply_sport)[0],
        _state(protocol, status, fields.get(CTA_PROTOINFO, b"")),
        timeout,
        age,
        id_,
    )


def _orig_addresses(buf: bytes, start: int, end: int, family: int) -> tuple[bytes, bytes]:
    """The original direction's source and destination, read before anything else: where the
    kernel lays them out (the original tuple first, its addresses first in it: checked by their
    attribute types), else by walking the attributes."""
    size = SIZE[family]
    src_kind, dst_kind = (
        (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == 4 else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    )
    if end - start >= 16 + 2 * size:
        orig, ip = _TYPE.unpack_from(buf, start + 2)[0], _TYPE.unpack_from(buf, start + 6)[0]
        src_at, dst_at = start + 12, start + 16 + size
        first, second = _TYPE.unpack_from(buf, src_at - 2)[0], _TYPE.unpack_from(buf, dst_at - 2)[0]
        layout = (orig & NLA_TYPE_MASK, ip & NLA_TYPE_MASK, first, second)
        if layout == (CTA_TUPLE_ORIG, CTA_TUPLE_IP, src_kind, dst_kind):
            return buf[src_at : src_at + size], buf[dst_at : dst_at + size]
    ip_span = _span(buf, *_span(buf, start, end, CTA_TUPLE_ORIG), CTA_TUPLE_IP)
    return _find(buf, *ip_span, src_kind), _find(buf, *ip_span, dst_kind)


def dump_flows(
    ct: CtSocket, family: int, protocol: int, addresses: Collection[str] | None = None
) -> Iterator[Flow]:
    """Every flow of `protocol` (TCP, UDP or SCTP) in `family`: the kernel filters them; with
    `addresses`, only those whose original source or destination is one of them (the other
    entries are skipped before being read)."""
    now_ns = time.time_ns()
    af = AF[family]
    wanted = None
    if addresses is not None:
        wanted = {socket.inet_pton(af, a) for a in addresses if (":" in a) == (family == 6)}
    for data, start, end in ct.dump(family, protocol_filter_attrs(protocol)):
        if wanted is not None:
            src, dst = _orig_addresses(data, start, end, family)
            if dst not in wanted and src not in wanted:
                continue
        flow = decode_full_flow(data, start, end, family, protocol, now_ns)
        if flow is not None:
            yield flow
