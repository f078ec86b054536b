"""The IR as nf_tables netlink attributes, encoded by pyroute2's nftables message classes
(`pyroute2.netlink.nfnetlink.nftsocket`), in the kernel's own canonical form: attributes in the
order, and with the defaults, that the kernel dumps them back. So what kproxy sends for a rule is
byte for byte what a later dump of that rule returns, and a foreign change shows as a difference
of bytes.

pyroute2 encodes a message in about a millisecond, which would make a cold start at 10,000
services take minutes. But the table is made of few distinct pieces: the same expressions with
another address, port or chain name. So pyroute2 encodes each distinct piece once (the caches
below), and a piece whose value varies is a `Spliced` template: pyroute2's encoding of it with
probe values, with the bytes each value occupies located by a second encoding. Joining pieces
into a message is netlink's attribute framing (a 4-byte length and type, the payload padded to 4
bytes), with the attribute numbers read from pyroute2's maps. tests/test_nftables_encode.py checks
whole messages against pyroute2 encoding them in one go."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from pyroute2.netlink.nfnetlink.nftsocket import (
    nft_chain_msg,
    nft_rule_msg,
    nft_set_elem_list_msg,
    nft_set_msg,
    nft_table_msg,
)

from kproxy.dataplane.nftables.netlink import iter_attrs
from kproxy.plan.nftables.ir import (
    Chain,
    CtStateNew,
    Dnat,
    Element,
    FibLocal,
    Key,
    Lookup,
    MarkClear,
    MarkSet,
    Masquerade,
    Match,
    NamedSet,
    NumgenZero,
    PortMatch,
    Reject,
    Rule,
    Statement,
    Update,
    Verdict,
    Vmap,
)

Attrs = list[tuple[str, Any]]  # pyroute2's form of a message's or a nest's attributes

REG_VERDICT = 0
REG_1 = 1
REG_2 = 2
REG32_00 = 8

_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_VERDICTS = {"drop": 0, "accept": 1, "jump": -3, "goto": -4, "return": -5}
_NFPROTO = {4: 2, 6: 10}
_ICMP_PORT_UNREACH = {4: 3, 6: 4}
DATATYPES = {
    "ipv4_addr": (7, 4),
    "ipv6_addr": (8, 16),
    "inet_proto": (12, 1),
    "inet_service": (13, 2),
}
NFT_DATA_VERDICT = 0xFFFFFF00
_SET_FLAGS = {
    "dynamic": "NFT_SET_EVAL",
    "timeout": "NFT_SET_TIMEOUT",
    "interval": "NFT_SET_INTERVAL",
}
# What nft 1.0.6 writes as a set's user data before its comment: the key byte order of a plain
# address set, and for a verdict map the byte orders and typeof hints it always adds.
_SET_UDATA_ADDRESS: list[tuple[str, bytes | str]] = [
    ("NFTNL_UDATA_SET_KEYBYTEORDER", bytes.fromhex("02000000"))
]
_SET_UDATA_MAP: list[tuple[str, bytes | str]] = [
    ("NFTNL_UDATA_SET_KEYBYTEORDER", bytes(4)),
    ("NFTNL_UDATA_SET_DATABYTEORDER", bytes(4)),
    ("NFTNL_UDATA_SET_KEY_TYPEOF", bytes.fromhex("00040d0000000100")),
    ("NFTNL_UDATA_SET_DATA_INTERVAL", bytes(4)),
]
# pyroute2 declares NFTA_FIB_RESULT as flags; the kernel's value is an enum, and its "address
# type" (3) is given here as the two lowest flags.
_FIB_RESULT_ADDRTYPE = {"NFT_FIB_RESULT_UNSPEC", "NFT_FIB_RESULT_OIF"}


# --- pyroute2, and netlink's framing -------------------------------------------------------

_NFGEN_HEADER = 20  # nlmsghdr (16 bytes) and nfgenmsg (4)
_HEAD = struct.Struct("<HH")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class EncodingError(RuntimeError):
    """pyroute2's encoding of a piece did not have the layout a template needs."""


def _numbers(cls: Any) -> dict[str, int]:
    """A pyroute2 message class's attribute numbers by name."""
    out: dict[str, int] = {}
    for index, entry in enumerate(cls.nla_map):
        if isinstance(entry[0], int):
            out[entry[1]] = entry[0]
        else:
            out[entry[0]] = index
    return out


TABLE = _numbers(nft_table_msg)
CHAIN = _numbers(nft_chain_msg)
RULE = _numbers(nft_rule_msg)
SET = _numbers(nft_set_msg)
ELEMENTS = _numbers(nft_set_elem_list_msg)


def pyroute2_attrs(cls: Any, attrs: Attrs) -> bytes:
    """A message's attributes as pyroute2 encodes them (after the message's headers)."""
    msg = cls()
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data[_NFGEN_HEADER:])


def attr(kind: int, data: bytes) -> bytes:
    """netlink's framing of one attribute around an encoded payload."""
    length = 4 + len(data)
    return _HEAD.pack(length, kind) + data + _PAD[length % 4]


def payload_of(encoded: bytes) -> bytes:
    """The payload of the one attribute `encoded` holds (its header and padding stripped)."""
    length = _HEAD.unpack_from(encoded)[0]
    if len(encoded) != (length + 3) & ~3:
        raise EncodingError(f"expected one attribute, got {len(encoded)} bytes for {length}")
    return encoded[4:length]


@dataclass(frozen=True, slots=True)
class Spliced:
    """pyroute2's encoding of one shape with its variable values cut out: the constant parts
    around each value, which `fill` joins with new values of the same sizes."""

    parts: tuple[bytes, ...]

    def around(self, value: bytes) -> bytes:
        """`fill` of a one-value template (most are: the hot path)."""
        parts = self.parts
        return parts[0] + value + parts[1]

    def fill(self, *values: bytes) -> bytes:
        out = [self.parts[0]]
        for value, part in zip(values, self.parts[1:], strict=True):
            out.append(value)
            out.append(part)
        return b"".join(out)


def spliced(build: Callable[..., bytes], *sizes: int) -> Spliced:
    """Encode `build` with probe values of the given sizes, then once more per value with a
    different probe: the bytes that change are where that value goes. Refused unless each
    value occupies exactly its own size in one run, the same in every encoding."""
    probes = [b"a" * size for size in sizes]
    base = build(*probes)
    cuts: list[int] = []
    for index, size in enumerate(sizes):
        other = build(*probes[:index], b"b" * size, *probes[index + 1 :])
        changed = [i for i in range(len(base)) if base[i] != other[i]]
        if len(other) != len(base) or len(changed) != size or changed[-1] - changed[0] + 1 != size:
            raise EncodingError(f"value {index} of {size} bytes is not one run in {base.hex()}")
        cuts.append(changed[0])
    parts: list[bytes] = []
    start = 0
    for cut, size in sorted(zip(cuts, sizes, strict=True)):
        if cut < start:
            raise EncodingError(f"values overlap in {base.hex()}")
        parts.append(base[start:cut])
        start = cut + size
    parts.append(base[start:])
    if [c for c, _ in sorted(zip(cuts, sizes, strict=True))] != cuts:
        raise EncodingError("values out of order")
    return Spliced(tuple(parts))


def _ascii(probe: bytes) -> str:
    return probe.decode("ascii")


def _name(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


@lru_cache(maxsize=256)
def _string_template(cls: Any, kind: str, size: int) -> Spliced:
    return spliced(lambda v: pyroute2_attrs(cls, [(kind, _ascii(v))]), size)


@lru_cache(maxsize=1 << 16)
def _string(cls: Any, kind: str, value: str) -> bytes:
    """One NUL-terminated string attribute (cached: a chain's name comes with each of its
    rules)."""
    raw = _name(value)
    return _string_template(cls, kind, len(raw)).around(raw)


# --- expressions ---------------------------------------------------------------------------


def expression(name: str, data: Attrs) -> bytes:
    """One expression of a rule's list, as pyroute2 encodes it."""
    encoded = pyroute2_attrs(
        nft_rule_msg,
        [
            (
                "NFTA_RULE_EXPRESSIONS",
                [{"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": data})]}],
            )
        ],
    )
    return payload_of(encoded)


def _value(value: bytes) -> dict[str, Attrs]:
    return {"attrs": [("NFTA_DATA_VALUE", value)]}


def _verdict_attrs(kind: str, chain: str | None) -> dict[str, Attrs]:
    verdict: Attrs = [("NFTA_VERDICT_CODE", _VERDICTS[kind])]
    if chain is not None:
        verdict.append(("NFTA_VERDICT_CHAIN", chain))
    return {"attrs": [("NFTA_DATA_VERDICT", {"attrs": verdict})]}


def _host32(value: int) -> bytes:
    """A 32-bit register value in host byte order (ct state, fib type, mark)."""
    return struct.pack("=I", value & 0xFFFFFFFF)


@lru_cache(maxsize=256)
def _payload(dreg: int, base: int, offset: int, length: int) -> bytes:
    return expression(
        "payload",
        [
            ("NFTA_PAYLOAD_DREG", dreg),
            ("NFTA_PAYLOAD_BASE", base),
            ("NFTA_PAYLOAD_OFFSET", offset),
            ("NFTA_PAYLOAD_LEN", length),
        ],
    )


@lru_cache(maxsize=256)
def _meta_load(key: int, dreg: int) -> bytes:
    return expression("meta", [("NFTA_META_KEY", key), ("NFTA_META_DREG", dreg)])


@lru_cache(maxsize=64)
def _cmp_template(op: int, size: int) -> Spliced:
    return spliced(
        lambda v: expression(
            "cmp", [("NFTA_CMP_SREG", REG_1), ("NFTA_CMP_OP", op), ("NFTA_CMP_DATA", _value(v))]
        ),
        size,
    )


def _cmp(op: int, value: bytes) -> bytes:
    return _cmp_template(op, len(value)).around(value)


@lru_cache(maxsize=64)
def _immediate_template(dreg: int, size: int) -> Spliced:
    return spliced(
        lambda v: expression(
            "immediate", [("NFTA_IMMEDIATE_DREG", dreg), ("NFTA_IMMEDIATE_DATA", _value(v))]
        ),
        size,
    )


def _immediate(dreg: int, value: bytes) -> bytes:
    return _immediate_template(dreg, len(value)).around(value)


@lru_cache(maxsize=4)
def _nat(family: int) -> bytes:
    """DNAT to the address in reg 1 and the port in reg 2."""
    return expression(
        "nat",
        [
            ("NFTA_NAT_TYPE", 1),  # dnat
            ("NFTA_NAT_FAMILY", _NFPROTO[family]),
            ("NFTA_NAT_REG_ADDR_MIN", REG_1),
            ("NFTA_NAT_REG_ADDR_MAX", REG_1),
            ("NFTA_NAT_REG_PROTO_MIN", REG_2),
            ("NFTA_NAT_REG_PROTO_MAX", REG_2),
            ("NFTA_NAT_FLAGS", {"NF_NAT_RANGE_MAP_IPS", "NF_NAT_RANGE_PROTO_SPECIFIED"}),
        ],
    )


@lru_cache(maxsize=256)
def _bitwise(mask: bytes, xor: bytes) -> bytes:
    return expression(
        "bitwise",
        [
            ("NFTA_BITWISE_SREG", REG_1),
            ("NFTA_BITWISE_DREG", REG_1),
            ("NFTA_BITWISE_LEN", len(mask)),
            ("NFTA_BITWISE_OP", 0),  # boolean: (reg & mask) ^ xor
            ("NFTA_BITWISE_MASK", _value(mask)),
            ("NFTA_BITWISE_XOR", _value(xor)),
        ],
    )


@lru_cache(maxsize=256)
def _lookup(set_name: str, verdict: bool) -> bytes:
    data: Attrs = [("NFTA_LOOKUP_SET", set_name), ("NFTA_LOOKUP_SREG", REG_1)]
    if verdict:
        data.append(("NFTA_LOOKUP_DREG", REG_VERDICT))
    data.append(("NFTA_LOOKUP_FLAGS", set()))
    return expression("lookup", data)


@lru_cache(maxsize=256)
def _dynset_template(size: int) -> Spliced:
    """Add or refresh the key in reg 1 in a named set (its name is the value)."""
    return spliced(
        lambda v: expression(
            "dynset",
            [
                ("NFTA_DYNSET_SREG_KEY", REG_1),
                ("NFTA_DYNSET_OP", 1),  # update
                ("NFTA_DYNSET_SET_NAME", _ascii(v)),
                ("NFTA_DYNSET_TIMEOUT", 0),
                ("NFTA_DYNSET_FLAGS", set()),
            ],
        ),
        size,
    )


@lru_cache(maxsize=1024)
def _verdict_template(kind: str, size: int) -> Spliced:
    return spliced(
        lambda v: expression(
            "immediate",
            [
                ("NFTA_IMMEDIATE_DREG", REG_VERDICT),
                ("NFTA_IMMEDIATE_DATA", _verdict_attrs(kind, _ascii(v))),
            ],
        ),
        size,
    )


@lru_cache(maxsize=16)
def _plain_verdict(kind: str) -> bytes:
    return expression(
        "immediate",
        [("NFTA_IMMEDIATE_DREG", REG_VERDICT), ("NFTA_IMMEDIATE_DATA", _verdict_attrs(kind, None))],
    )


def encode_verdict(v: Verdict) -> bytes:
    if v.chain is None:
        return _plain_verdict(v.kind)
    name = _name(v.chain)
    return _verdict_template(v.kind, len(name)).around(name)


# --- statements ----------------------------------------------------------------------------


def _field(key: Key, family: int) -> tuple[int, int]:
    """(network header offset, length) of an address field."""
    if family == 4:
        return (12 if key is Key.SADDR else 16), 4
    return (8 if key is Key.SADDR else 24), 16


def _load(key: Key, family: int, dreg: int) -> tuple[bytes, int]:
    """The expression loading `key` into `dreg`, and the field's length."""
    if key in (Key.SADDR, Key.DADDR):
        offset, length = _field(key, family)
        return _payload(dreg, 1, offset, length), length
    if key is Key.L4PROTO:
        return _meta_load(16, dreg), 1
    if key is Key.DPORT:
        return _payload(dreg, 2, 2, 2), 2
    return _meta_load(6, dreg), 16  # IIFNAME


def _load_keys(keys: tuple[Key, ...], family: int) -> bytes:
    """Load a concatenation into consecutive 32-bit registers, each field rounded up to 4
    bytes. A register on a 16-byte boundary goes by its 16-byte name, as the kernel dumps it."""
    out = []
    offset = 0
    for key in keys:
        index = offset // 4
        dreg = index // 4 + REG_1 if index % 4 == 0 else REG32_00 + index
        expr, length = _load(key, family, dreg)
        out.append(expr)
        offset += (length + 3) & ~3
    return b"".join(out)


def _address_match(key: Key, value: str, family: int, op: int) -> bytes:
    offset, length = _field(key, family)
    if "/" not in value:  # one address: the common case, without ipaddress's parsing
        packed = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, value)
        return _payload(REG_1, 1, offset, length) + _cmp(op, packed)
    return _cidr_match(key, value, family, op)


@lru_cache(maxsize=4096)
def _cidr_match(key: Key, value: str, family: int, op: int) -> bytes:
    offset, length = _field(key, family)
    net = ipaddress.ip_network(value, strict=False)
    packed = net.network_address.packed
    prefix = net.prefixlen
    if prefix == net.max_prefixlen:
        return _payload(REG_1, 1, offset, length) + _cmp(op, packed)
    if prefix % 8 == 0:
        size = prefix // 8
        return _payload(REG_1, 1, offset, size) + _cmp(op, packed[:size])
    mask = net.netmask.packed
    return _payload(REG_1, 1, offset, length) + _bitwise(mask, bytes(length)) + _cmp(op, packed)


def _iifname(value: str) -> bytes:
    if value.endswith("+"):
        return value[:-1].encode()
    return value.encode().ljust(16, b"\0")[:16]


def _match(stmt: Match, family: int) -> bytes:
    op = 1 if stmt.negate else 0
    if stmt.key in (Key.SADDR, Key.DADDR):
        return _address_match(stmt.key, stmt.value, family, op)
    if stmt.key is Key.L4PROTO:
        return _meta_load(16, REG_1) + _cmp(op, bytes([_PROTOCOLS[stmt.value]]))
    if stmt.key is Key.DPORT:
        return _payload(REG_1, 2, 2, 2) + _cmp(op, struct.pack(">H", int(stmt.value)))
    return _meta_load(6, REG_1) + _cmp(op, _iifname(stmt.value))


def _port_match(stmt: PortMatch, family: int) -> bytes:
    return (
        _meta_load(16, REG_1)
        + _cmp(0, bytes([_PROTOCOLS[stmt.proto]]))
        + _payload(REG_1, 2, 2, 2)
        + _cmp(0, struct.pack(">H", stmt.port))
    )


def _ct_state_new(stmt: CtStateNew, family: int) -> bytes:
    ct = expression("ct", [("NFTA_CT_DREG", REG_1), ("NFTA_CT_KEY", 0)])  # state
    return ct + _bitwise(_host32(8), bytes(4)) + _cmp(1, bytes(4))


def _fib_local(stmt: FibLocal, family: int) -> bytes:
    fib = expression(
        "fib",
        [
            ("NFTA_FIB_DREG", REG_1),
            ("NFTA_FIB_RESULT", _FIB_RESULT_ADDRTYPE),
            ("NFTA_FIB_FLAGS", 1 if stmt.key is Key.SADDR else 2),
        ],
    )
    return fib + _cmp(0, _host32(2))  # RTN_LOCAL


def _mark_clear(stmt: MarkClear, family: int) -> bytes:
    return _meta_load(3, REG_1) + _bitwise(_host32(stmt.mask), bytes(4)) + _cmp(0, bytes(4))


def _numgen_zero(stmt: NumgenZero, family: int) -> bytes:
    numgen = expression(
        "numgen",
        [
            ("NFTA_NG_DREG", REG_1),
            ("NFTA_NG_MODULUS", stmt.modulus),
            ("NFTA_NG_TYPE", 1),  # random
            ("NFTA_NG_OFFSET", 0),
        ],
    )
    return numgen + _cmp(0, bytes(4))


def _set_lookup(stmt: Lookup, family: int) -> bytes:
    return _load_keys(stmt.keys, family) + _lookup(stmt.set_name, verdict=False)


def _map_lookup(stmt: Vmap, family: int) -> bytes:
    return _load_keys(stmt.keys, family) + _lookup(stmt.map_name, verdict=True)


def _reject(stmt: Reject, family: int) -> bytes:
    return expression(
        "reject", [("NFTA_REJECT_TYPE", 0), ("NFTA_REJECT_ICMP_CODE", _ICMP_PORT_UNREACH[family])]
    )


def _dnat(stmt: Dnat, family: int) -> bytes:
    address = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, stmt.ip)
    return (
        _immediate(REG_1, address) + _immediate(REG_2, struct.pack(">H", stmt.port)) + _nat(family)
    )


def _masquerade(stmt: Masquerade, family: int) -> bytes:
    return expression("masq", [("NFTA_MASQ_FLAGS", {"NF_NAT_RANGE_PROTO_RANDOM_FULLY"})])


def _mark_set(stmt: MarkSet, family: int) -> bytes:
    mask, xor = (~stmt.value, stmt.value) if stmt.op == "|" else (0xFFFFFFFF, stmt.value)
    return (
        _meta_load(3, REG_1)
        + _bitwise(_host32(mask), _host32(xor))
        + expression("meta", [("NFTA_META_KEY", 3), ("NFTA_META_SREG", REG_1)])
    )


def _update(stmt: Update, family: int) -> bytes:
    load, _length = _load(stmt.key, family, REG_1)
    name = _name(stmt.set_name)
    return load + _dynset_template(len(name)).around(name)


def _verdict(stmt: Verdict, family: int) -> bytes:
    return encode_verdict(stmt)


# Statements that carry an address, a port or a chain name are filled in per rule; the others
# are the same in many rules, and encoded once.
_PER_RULE: dict[type, Callable[[Any, int], bytes]] = {
    Match: _match,
    Verdict: _verdict,
    Dnat: _dnat,
    Update: _update,
}
_SHARED: dict[type, Callable[[Any, int], bytes]] = {
    PortMatch: _port_match,
    CtStateNew: _ct_state_new,
    FibLocal: _fib_local,
    MarkClear: _mark_clear,
    NumgenZero: _numgen_zero,
    Lookup: _set_lookup,
    Vmap: _map_lookup,
    Reject: _reject,
    Masquerade: _masquerade,
    MarkSet: _mark_set,
}


@lru_cache(maxsize=4096)
def _shared_statement(stmt: Statement, family: int) -> bytes:
    return _SHARED[type(stmt)](stmt, family)


def _statement(stmt: Statement, family: int) -> bytes:
    per_rule = _PER_RULE.get(type(stmt))
    if per_rule is not None:
        return per_rule(stmt, family)
    if type(stmt) not in _SHARED:
        raise TypeError(f"unknown statement {stmt!r}")
    return _shared_statement(stmt, family)


# --- messages ------------------------------------------------------------------------------

COMMENT_LIMIT = 250  # nft keeps a comment in one user-data record (at most 255 bytes)


@lru_cache(maxsize=64)
def _comment_template(cls: Any, kind: str, size: int) -> Spliced:
    return spliced(lambda v: payload_of(pyroute2_attrs(cls, [(kind, _ascii(v))])), size)


def _comment(cls: Any, kind: str, value: str) -> bytes:
    """A comment as the user-data record nft writes (the attribute's payload)."""
    raw = _name(value[:COMMENT_LIMIT])
    return _comment_template(cls, kind, len(raw)).around(raw)


def encode_rule(rule: Rule, family: int) -> tuple[bytes, bytes]:
    """(expressions, user data) of a rule: the parts a dump of it returns."""
    exprs = b"".join([_statement(s, family) for s in rule.statements])
    udata = _comment(nft_rule_msg, "NFTA_RULE_USERDATA", rule.comment) if rule.comment else b""
    return exprs, udata


@lru_cache(maxsize=1 << 17)
def rule_chain_attrs(table: str, chain: str) -> bytes:
    """A rule message's table and chain (all a chain's rules, when nothing else follows)."""
    return _string(nft_rule_msg, "NFTA_RULE_TABLE", table) + _string(
        nft_rule_msg, "NFTA_RULE_CHAIN", chain
    )


def rule_attrs(table: str, chain: str, rule: Rule, family: int) -> bytes:
    exprs, udata = encode_rule(rule, family)
    comment = attr(RULE["NFTA_RULE_USERDATA"], udata) if udata else b""
    return rule_chain_attrs(table, chain) + attr(RULE["NFTA_RULE_EXPRESSIONS"], exprs) + comment


@lru_cache(maxsize=256)
def _defined_chain(table: str, name: str, hook: Any, comment: str | None) -> bytes:
    attrs: Attrs = [("NFTA_CHAIN_TABLE", table), ("NFTA_CHAIN_NAME", name)]
    if hook is not None:
        attrs += [
            ("NFTA_CHAIN_TYPE", hook.type),
            ("NFTA_CHAIN_POLICY", 1),  # accept
            (
                "NFTA_CHAIN_HOOK",
                {
                    "attrs": [
                        ("NFTA_HOOK_HOOKNUM", _HOOKS[hook.hook]),
                        ("NFTA_HOOK_PRIORITY", hook.priority),
                    ]
                },
            ),
        ]
    if comment:
        attrs.append(("NFTA_CHAIN_USERDATA", comment[:COMMENT_LIMIT]))
    return pyroute2_attrs(nft_chain_msg, attrs)


def chain_name_attrs(table: str, name: str) -> bytes:
    return _string(nft_chain_msg, "NFTA_CHAIN_TABLE", table) + _string(
        nft_chain_msg, "NFTA_CHAIN_NAME", name
    )


def chain_attrs(table: str, chain: Chain) -> bytes:
    if chain.hook is None and not chain.comment:
        return chain_name_attrs(table, chain.name)
    return _defined_chain(table, chain.name, chain.hook, chain.comment)


@lru_cache(maxsize=16)
def table_attrs(name: str, comment: str | None = None) -> bytes:
    attrs: Attrs = [("NFTA_TABLE_NAME", name), ("NFTA_TABLE_FLAGS", 0)]
    if comment:
        attrs.append(("NFTA_TABLE_USERDATA", comment[:COMMENT_LIMIT]))
    return pyroute2_attrs(nft_table_msg, attrs)


@lru_cache(maxsize=16)
def table_name_attrs(name: str) -> bytes:
    """The table's name: what a request or a dump filtered to the table carries (every
    nf_tables message numbers the table's name 1)."""
    return _string(nft_table_msg, "NFTA_TABLE_NAME", name)


def _key_type(types: tuple[str, ...]) -> tuple[int, int]:
    kind = 0
    length = 0
    for name in types:
        datatype, size = DATATYPES[name]
        kind = (kind << 6) | datatype
        length += (size + 3) & ~3 if len(types) > 1 else size
    return kind, length


def _set_flag_bit(name: str) -> int:
    return 1 << list(nft_set_msg.set_flags.ops).index(name)


SET_MAP_BIT = _set_flag_bit("NFT_SET_MAP")
SET_FLAG_BITS = {flag: _set_flag_bit(name) for flag, name in _SET_FLAGS.items()}  # for decoding
SET_COMMENT_UDATA = nft_set_msg.set_udata.udata_types.index("NFTNL_UDATA_SET_COMMENT")


def set_udata_prefix(verdict_map: bool) -> bytes:
    """A set's user data before its comment."""
    return bytes(
        nft_set_msg.set_udata.udata_encode(_SET_UDATA_MAP if verdict_map else _SET_UDATA_ADDRESS)
    )


def _set_message(table: str, s: NamedSet, set_id: int) -> bytes:
    flags = {"NFT_SET_MAP"} if s.verdict_map else set()
    flags.update(_SET_FLAGS[flag] for flag in s.flags)
    key_type, key_len = _key_type(s.key_types)
    attrs: Attrs = [
        ("NFTA_SET_TABLE", table),
        ("NFTA_SET_NAME", s.name),
        ("NFTA_SET_FLAGS", flags),
        ("NFTA_SET_KEY_TYPE", key_type),
        ("NFTA_SET_KEY_LEN", key_len),
    ]
    if s.verdict_map:
        attrs += [("NFTA_SET_DATA_TYPE", NFT_DATA_VERDICT), ("NFTA_SET_DATA_LEN", 0)]
    attrs.append(("NFTA_SET_ID", set_id))
    if s.size is not None:
        attrs.append(("NFTA_SET_DESC", {"attrs": [("NFTA_SET_DESC_SIZE", s.size)]}))
    if s.timeout is not None:
        attrs.append(("NFTA_SET_TIMEOUT", s.timeout * 1000))
    udata = list(_SET_UDATA_MAP if s.verdict_map else _SET_UDATA_ADDRESS)
    if s.comment:
        udata.append(("NFTNL_UDATA_SET_COMMENT", s.comment[:COMMENT_LIMIT]))
    attrs.append(("NFTA_SET_USERDATA", udata))
    return pyroute2_attrs(nft_set_msg, attrs)


@lru_cache(maxsize=1024)
def _set_template(table: str, shape: NamedSet, name_size: int) -> Spliced:
    """A set's definition with its name and its transaction id cut out: affinity sets differ
    only in those."""
    return spliced(
        lambda name, set_id: _set_message(
            table, replace(shape, name=_ascii(name)), struct.unpack(">I", set_id)[0]
        ),
        name_size,
        4,
    )


def set_attrs(table: str, s: NamedSet, set_id: int) -> bytes:
    name = _name(s.name)
    shape = replace(s, name="")
    return _set_template(table, shape, len(name)).fill(name, struct.pack(">I", set_id))


def set_name_attrs(table: str, name: str) -> bytes:
    return _string(nft_set_msg, "NFTA_SET_TABLE", table) + _string(
        nft_set_msg, "NFTA_SET_NAME", name
    )


def _key_part(value: str, concat: bool) -> bytes:
    if value in _PROTOCOLS:
        raw = bytes([_PROTOCOLS[value]])
    elif value.isdigit():
        raw = struct.pack(">H", int(value))
    else:
        raw = socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
    return raw + b"\0" * (-len(raw) % 4) if concat else raw


RAW_KEY_PREFIX = "raw:"  # a key given as its bytes, in hex


@lru_cache(maxsize=1 << 18)
def element_key(key: tuple[str, ...]) -> bytes:
    if len(key) == 1 and key[0].startswith(RAW_KEY_PREFIX):
        return bytes.fromhex(key[0][len(RAW_KEY_PREFIX) :])
    concat = len(key) > 1
    return b"".join(_key_part(part, concat) for part in key)


def _element(key: bytes, verdict: tuple[str, str | None] | None) -> bytes:
    """One element of an element list, as pyroute2 encodes it."""
    elem: Attrs = [("NFTA_SET_ELEM_KEY", {"attrs": [("NFTA_DATA_VALUE", key)]})]
    if verdict is not None:
        elem.append(("NFTA_SET_ELEM_DATA", _verdict_attrs(*verdict)))
    encoded = pyroute2_attrs(
        nft_set_elem_list_msg, [("NFTA_SET_ELEM_LIST_ELEMENTS", [{"attrs": elem}])]
    )
    return payload_of(encoded)


@lru_cache(maxsize=1024)
def _element_template(key_size: int, kind: str | None, chain_size: int) -> Spliced:
    if kind is None:
        return spliced(lambda key: _element(key, None), key_size)
    if not chain_size:
        return spliced(lambda key: _element(key, (kind, None)), key_size)
    return spliced(lambda key, chain: _element(key, (kind, _ascii(chain))), key_size, chain_size)


def encode_element(element: Element, with_data: bool = True) -> bytes:
    key = element_key(element.key)
    verdict = element.verdict if with_data else None
    if verdict is None:
        return _element_template(len(key), None, 0).around(key)
    if verdict.chain is None:
        return _element_template(len(key), verdict.kind, 0).around(key)
    chain = _name(verdict.chain)
    return _element_template(len(key), verdict.kind, len(chain)).fill(key, chain)


_ELEMENT_DATA = 2  # NFTA_SET_ELEM_DATA, inside an element


@lru_cache(maxsize=1 << 16)
def verdict_data(v: Verdict) -> bytes:
    """An element's NFTA_SET_ELEM_DATA payload, as the kernel dumps it."""
    element = payload_of(encode_element(Element(("raw:00",), v)))
    for kind, value in iter_attrs(element):
        if kind == _ELEMENT_DATA:
            return value
    raise EncodingError(f"no data in the element of {v}")


MAX_ELEMENTS_ATTR = 60000  # an attribute's length is 16 bits


def element_list_attrs(table: str, set_name: str) -> bytes:
    """An element list's table and set: the head of its messages and of a dump of it."""
    return _string(nft_set_elem_list_msg, "NFTA_SET_ELEM_LIST_TABLE", table) + _string(
        nft_set_elem_list_msg, "NFTA_SET_ELEM_LIST_SET", set_name
    )


def element_batches(
    table: str, set_name: str, elements: list[Element], with_data: bool = True
) -> list[bytes]:
    """NEWSETELEM/DELSETELEM attribute blocks, split to fit the 16-bit attribute length."""
    head = element_list_attrs(table, set_name)
    kind = ELEMENTS["NFTA_SET_ELEM_LIST_ELEMENTS"]
    out: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for element in elements:
        encoded = encode_element(element, with_data)
        if chunk and size + len(encoded) > MAX_ELEMENTS_ATTR:
            out.append(head + attr(kind, b"".join(chunk)))
            chunk, size = [], 0
        chunk.append(encoded)
        size += len(encoded)
    if chunk:
        out.append(head + attr(kind, b"".join(chunk)))
    return out
