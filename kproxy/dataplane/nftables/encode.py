"""The IR as nf_tables netlink attributes, in the kernel's own canonical form: attributes in the
order, and with the defaults, that the kernel dumps them back. So what kproxy sends for a rule is
byte for byte what a later dump of that rule returns, and a foreign change shows as a difference
of bytes."""

from __future__ import annotations

import ipaddress
import socket
import struct
from functools import lru_cache

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

REG_VERDICT = 0
REG_1 = 1
REG_2 = 2
REG32_00 = 8

_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
_COMMON = frozenset(
    [Match(Key.L4PROTO, p) for p in ("tcp", "udp", "sctp")]
    + [Verdict("jump", "mark-for-masquerade"), Verdict("drop"), Verdict("return")]
)
_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_VERDICTS = {"drop": 0, "accept": 1, "jump": -3, "goto": -4, "return": -5}
_NFPROTO = {4: 2, 6: 10}
_ICMP_PORT_UNREACH = {4: 3, 6: 4}
_DATATYPES = {
    "ipv4_addr": (7, 4),
    "ipv6_addr": (8, 16),
    "inet_proto": (12, 1),
    "inet_service": (13, 2),
}
NFT_DATA_VERDICT = 0xFFFFFF00
SET_MAP = 0x8
SET_TIMEOUT = 0x10
SET_EVAL = 0x20
_SET_FLAGS = {"dynamic": SET_EVAL, "timeout": SET_TIMEOUT, "interval": 0x4}
# What nft 1.0.6 writes as a set's user data before its comment: the key byte order of a plain
# address set, and for a verdict map the byte orders and typeof hints it always adds.
_SET_UDATA_ADDRESS = bytes.fromhex("000402000000")
_SET_UDATA_MAP = bytes.fromhex("000400000000010400000000030800040d0000000100060400000000")
_UDATA_COMMENT = 0
_SET_UDATA_COMMENT = 7


_HEAD = struct.Struct("<HH")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


def attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return _HEAD.pack(length, kind) + data + _PAD[length % 4]


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind, b"".join(parts))


@lru_cache(maxsize=4096)
def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">Q", value))


@lru_cache(maxsize=1 << 16)
def text(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute (cached: a chain's name comes with each of its rules)."""
    return attr(kind, value.encode("utf-8", "surrogateescape") + b"\0")


@lru_cache(maxsize=64)
def _expr_head(name: str) -> bytes:
    return text(1, name)


def _expr(name: str, *attrs: bytes) -> bytes:
    return nest(1, _expr_head(name), nest(2, *attrs))


def _data(kind: int, value: bytes) -> bytes:
    return nest(kind, attr(1, value))


def _host32(value: int) -> bytes:
    """A 32-bit register value in host byte order (ct state, fib type, mark)."""
    return struct.pack("=I", value & 0xFFFFFFFF)


# --- loading packet fields ------------------------------------------------------------------


@lru_cache(maxsize=256)
def _payload(dreg: int, base: int, offset: int, length: int) -> bytes:
    return _expr("payload", u32(1, dreg), u32(2, base), u32(3, offset), u32(4, length))


@lru_cache(maxsize=256)
def _meta_load(key: int, dreg: int) -> bytes:
    return _expr("meta", u32(2, key), u32(1, dreg))


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


def _split_tail(encoded: bytes, size: int) -> tuple[bytes, bytes]:
    """An expression whose innermost last attribute is a `size`-byte value, split around that
    value. Every enclosing length depends only on the size, so another value of the same size
    can be spliced in: most rules differ from each other only in an address or a chain name."""
    pad = _PAD[(4 + size) % 4]
    return encoded[: len(encoded) - size - len(pad)], pad


@lru_cache(maxsize=64)
def _cmp_template(op: int, size: int) -> tuple[bytes, bytes]:
    return _split_tail(_expr("cmp", u32(1, REG_1), u32(2, op), _data(3, bytes(size))), size)


@lru_cache(maxsize=64)
def _immediate_template(dreg: int, size: int) -> tuple[bytes, bytes]:
    return _split_tail(_expr("immediate", u32(1, dreg), _data(2, bytes(size))), size)


def _immediate(dreg: int, value: bytes) -> bytes:
    prefix, pad = _immediate_template(dreg, len(value))
    return prefix + value + pad


@lru_cache(maxsize=4)
def _nat(family: int) -> bytes:
    """DNAT to the address in reg 1 and the port in reg 2."""
    regs = (u32(3, REG_1), u32(4, REG_1), u32(5, REG_2), u32(6, REG_2))
    return _expr("nat", u32(1, 1), u32(2, _NFPROTO[family]), *regs, u32(7, 3))


def _cmp(op: int, value: bytes) -> bytes:
    prefix, pad = _cmp_template(op, len(value))
    return prefix + value + pad


def _bitwise(mask: bytes, xor: bytes) -> bytes:
    return _expr(
        "bitwise",
        u32(1, REG_1),
        u32(2, REG_1),
        u32(3, len(mask)),
        u32(6, 0),
        _data(4, mask),
        _data(5, xor),
    )


def _address_match(key: Key, value: str, family: int, op: int) -> bytes:
    offset, length = _field(key, family)
    if "/" not in value:  # one address: the common case, without ipaddress's parsing
        packed = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, value)
        return _payload(REG_1, 1, offset, length) + _cmp(op, packed)
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


def _verdict_data(v: Verdict) -> bytes:
    chain = (text(2, v.chain),) if v.chain else ()
    return nest(2, u32(1, _VERDICTS[v.kind]), *chain)


def verdict_data(v: Verdict) -> bytes:
    """An element's NFTA_SET_ELEM_DATA payload, as the kernel dumps it."""
    return _verdict_data(v)


def _encode_verdict_slow(v: Verdict) -> bytes:
    return _expr("immediate", u32(1, REG_VERDICT), nest(2, _verdict_data(v)))


@lru_cache(maxsize=1024)
def _verdict_template(kind: str, size: int) -> tuple[bytes, bytes]:
    blank = Verdict(kind, "x" * (size - 1))
    return _split_tail(_encode_verdict_slow(blank), size)


def encode_verdict(v: Verdict) -> bytes:
    if v.chain is None:
        return _encode_verdict_slow(v)
    name = v.chain.encode("utf-8", "surrogateescape") + b"\0"
    prefix, pad = _verdict_template(v.kind, len(name))
    return prefix + name + pad


_SHARED = (PortMatch, CtStateNew, FibLocal, MarkClear, NumgenZero, Reject, Masquerade, MarkSet)


@lru_cache(maxsize=4096)
def _shared_statement(stmt: Statement, family: int) -> bytes:
    return _encode_statement(stmt, family)


def _statement(stmt: Statement, family: int) -> bytes:
    """Statements many rules share are encoded once; an address or a chain name is not worth
    the cache."""
    if isinstance(stmt, _SHARED) or (isinstance(stmt, (Match, Verdict)) and stmt in _COMMON):
        return _shared_statement(stmt, family)
    return _encode_statement(stmt, family)


def _encode_statement(stmt: Statement, family: int) -> bytes:
    match stmt:
        case Match():
            return _match(stmt, family)
        case PortMatch(proto, port):
            return (
                _meta_load(16, REG_1)
                + _cmp(0, bytes([_PROTOCOLS[proto]]))
                + _payload(REG_1, 2, 2, 2)
                + _cmp(0, struct.pack(">H", port))
            )
        case CtStateNew():
            ct = _expr("ct", u32(1, REG_1), u32(2, 0))
            return ct + _bitwise(_host32(8), bytes(4)) + _cmp(1, bytes(4))
        case FibLocal(key):
            flags = 1 if key is Key.SADDR else 2
            fib = _expr("fib", u32(1, REG_1), u32(2, 3), u32(3, flags))
            return fib + _cmp(0, _host32(2))
        case MarkClear(mask):
            return _meta_load(3, REG_1) + _bitwise(_host32(mask), bytes(4)) + _cmp(0, bytes(4))
        case NumgenZero(modulus):
            numgen = _expr("numgen", u32(1, REG_1), u32(2, modulus), u32(3, 1), u32(4, 0))
            return numgen + _cmp(0, bytes(4))
        case Lookup(keys, set_name):
            lookup = _expr("lookup", text(1, set_name), u32(2, REG_1), u32(5, 0))
            return _load_keys(keys, family) + lookup
        case Vmap(keys, map_name):
            lookup = _expr(
                "lookup", text(1, map_name), u32(2, REG_1), u32(3, REG_VERDICT), u32(5, 0)
            )
            return _load_keys(keys, family) + lookup
        case Verdict():
            return encode_verdict(stmt)
        case Reject():
            return _expr("reject", u32(1, 0), attr(2, bytes([_ICMP_PORT_UNREACH[family]])))
        case Dnat(ip, port):
            address = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, ip)
            return (
                _immediate(REG_1, address)
                + _immediate(REG_2, struct.pack(">H", port))
                + _nat(family)
            )
        case Masquerade():
            return _expr("masq", u32(1, 0x10))
        case MarkSet(op, value):
            mask, xor = (~value, value) if op == "|" else (0xFFFFFFFF, value)
            return (
                _meta_load(3, REG_1)
                + _bitwise(_host32(mask), _host32(xor))
                + _expr("meta", u32(2, 3), u32(3, REG_1))
            )
        case Update(set_name, key):
            load, _length = _load(key, family, REG_1)
            dynset = _expr(
                "dynset", u32(4, REG_1), u32(3, 1), text(1, set_name), u64(6, 0), u32(9, 0)
            )
            return load + dynset
    raise TypeError(f"unknown statement {stmt!r}")


def _udata(kind: int, value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape") + b"\0"
    return bytes([kind, len(data)]) + data


def encode_rule(rule: Rule, family: int) -> tuple[bytes, bytes]:
    """(expressions, user data) of a rule: the parts a dump of it returns."""
    exprs = b"".join(_statement(s, family) for s in rule.statements)
    udata = _udata(_UDATA_COMMENT, rule.comment[:250]) if rule.comment else b""
    return exprs, udata


def rule_attrs(table: str, chain: str, rule: Rule, family: int) -> bytes:
    exprs, udata = encode_rule(rule, family)
    comment = attr(7, udata) if udata else b""
    return text(1, table) + text(2, chain) + attr(4, exprs) + comment


def chain_attrs(table: str, chain: Chain) -> bytes:
    out = text(1, table) + text(3, chain.name)
    if chain.hook is not None:
        hook = chain.hook
        out += text(7, hook.type) + u32(5, 1)
        out += nest(4, u32(1, _HOOKS[hook.hook]), u32(2, hook.priority))
    if chain.comment:
        out += attr(12, _udata(_UDATA_COMMENT, chain.comment))
    return out


def chain_name_attrs(table: str, name: str) -> bytes:
    return text(1, table) + text(3, name)


def table_attrs(name: str, comment: str | None = None) -> bytes:
    out = text(1, name) + u32(2, 0)
    if comment:
        out += attr(6, _udata(_UDATA_COMMENT, comment))
    return out


def _key_type(types: tuple[str, ...]) -> tuple[int, int]:
    kind = 0
    length = 0
    for name in types:
        datatype, size = _DATATYPES[name]
        kind = (kind << 6) | datatype
        length += (size + 3) & ~3 if len(types) > 1 else size
    return kind, length


def set_attrs(table: str, s: NamedSet, set_id: int) -> bytes:
    flags = SET_MAP if s.verdict_map else 0
    for flag in s.flags:
        flags |= _SET_FLAGS[flag]
    key_type, key_len = _key_type(s.key_types)
    out = text(1, table) + text(2, s.name) + u32(3, flags) + u32(4, key_type) + u32(5, key_len)
    if s.verdict_map:
        out += u32(6, NFT_DATA_VERDICT) + u32(7, 0)
    out += u32(10, set_id)
    if s.size is not None:
        out += nest(9, u32(1, s.size))
    if s.timeout is not None:
        out += u64(11, s.timeout * 1000)
    udata = _SET_UDATA_MAP if s.verdict_map else _SET_UDATA_ADDRESS
    if s.comment:
        udata += _udata(_SET_UDATA_COMMENT, s.comment)
    return out + attr(13, udata)


def set_name_attrs(table: str, name: str) -> bytes:
    return text(1, table) + text(2, name)


def _key_part(value: str, concat: bool) -> bytes:
    if value in _PROTOCOLS:
        raw = bytes([_PROTOCOLS[value]])
    elif value.isdigit():
        raw = struct.pack(">H", int(value))
    else:
        raw = ipaddress.ip_address(value).packed
    return raw + b"\0" * (-len(raw) % 4) if concat else raw


RAW_KEY_PREFIX = "raw:"  # a key given as its bytes, in hex


@lru_cache(maxsize=1 << 18)
def element_key(key: tuple[str, ...]) -> bytes:
    if len(key) == 1 and key[0].startswith(RAW_KEY_PREFIX):
        return bytes.fromhex(key[0][len(RAW_KEY_PREFIX) :])
    concat = len(key) > 1
    return b"".join(_key_part(part, concat) for part in key)


def encode_element(element: Element, with_data: bool = True) -> bytes:
    parts = [_data(1, element_key(element.key))]
    if with_data and element.verdict is not None:
        parts.append(nest(2, _verdict_data(element.verdict)))
    return nest(1, *parts)


MAX_ELEMENTS_ATTR = 60000  # an attribute's length is 16 bits


def element_batches(
    table: str, set_name: str, elements: list[Element], with_data: bool = True
) -> list[bytes]:
    """NEWSETELEM/DELSETELEM attribute blocks, split to fit the 16-bit attribute length."""
    head = text(1, table) + text(2, set_name)
    out: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for element in elements:
        encoded = encode_element(element, with_data)
        if chunk and size + len(encoded) > MAX_ELEMENTS_ATTR:
            out.append(head + attr(3, b"".join(chunk)))
            chunk, size = [], 0
        chunk.append(encoded)
        size += len(encoded)
    if chunk:
        out.append(head + attr(3, b"".join(chunk)))
    return out
