"""The kernel's dump of kproxy's table back into the IR (for `kproxy trace` and `dump --diff`):
the inverse of encode.py (and statements.py) for the statements kproxy writes. A rule is taken
only when encoding the decoded statements gives back exactly the kernel's bytes; anything else
(another program's rule in kproxy's table, a statement kproxy never writes) is reported as
unreadable rather than guessed."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from functools import lru_cache

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables.expressions import PROTOCOLS, REG_VERDICT, VERDICTS
from kproxy.dataplane.nftables.netlink import iter_attrs
from kproxy.plan.nftables import ir

_PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
_HOOK_NAMES = {number: name for name, number in e.HOOKS.items()}
_VERDICT_NAMES = {number: name for name, number in VERDICTS.items()}
_DATATYPE_NAMES = {number: name for name, (number, _size) in e.DATATYPES.items()}


class Undecodable(ValueError):
    """Bytes that are not one of kproxy's encodings."""


@dataclass(frozen=True, slots=True)
class Expr:
    name: str
    attrs: dict[int, bytes]

    def u32(self, kind: int) -> int | None:
        value = self.attrs.get(kind)
        return int(struct.unpack(">I", value[:4])[0]) if value is not None else None

    def data(self, kind: int) -> bytes:
        """The value of an NFTA_DATA nest (a cmp's or an immediate's)."""
        return dict(iter_attrs(self.attrs.get(kind, b""))).get(1, b"")


def text_of(value: bytes) -> str:
    return value.rstrip(b"\0").decode("utf-8", "surrogateescape")


@lru_cache(maxsize=1 << 16)
def _parse_expr(element: bytes) -> Expr:
    """One expression (cached: a load, a protocol comparison or a verdict recurs in most
    rules; never mutated)."""
    attrs = dict(iter_attrs(element))
    return Expr(text_of(attrs.get(1, b"")), dict(iter_attrs(attrs.get(2, b""))))


def parse_exprs(data: bytes) -> list[Expr]:
    return [_parse_expr(element) for _kind, element in iter_attrs(data)]


def _load_key(x: Expr, family: int) -> ir.Key | None:
    """The packet field a payload or meta expression loads (None: not a load kproxy writes)."""
    if x.name == "meta" and 1 in x.attrs:
        return {16: ir.Key.L4PROTO, 6: ir.Key.IIFNAME}.get(x.u32(2) or 0)
    if x.name != "payload":
        return None
    base, offset = x.u32(2), x.u32(3)
    if base == 2 and offset == 2:
        return ir.Key.DPORT
    if base == 1:
        saddr, daddr = (12, 16) if family == 4 else (8, 24)
        return {saddr: ir.Key.SADDR, daddr: ir.Key.DADDR}.get(offset or 0)
    return None


def _is_mark_load(x: Expr) -> bool:
    return x.name == "meta" and 1 in x.attrs and x.u32(2) == 3


def decode_verdict(data: bytes) -> ir.Verdict:
    """An NFTA_DATA_VERDICT's contents: code and chain."""
    attrs = dict(iter_attrs(data))
    code = struct.unpack(">i", attrs.get(1, b"\0\0\0\0")[:4])[0]
    kind = _VERDICT_NAMES.get(code)
    if kind is None:
        raise Undecodable(f"verdict code {code}")
    chain = text_of(attrs[2]) if 2 in attrs else None
    return ir.Verdict(kind, chain)


def _address(raw: bytes, family: int) -> str:
    size = 4 if family == 4 else 16
    return str(ipaddress.ip_address(raw.ljust(size, b"\0")))


def _address_match(key: ir.Key, xs: list[Expr], family: int) -> tuple[ir.Statement, int]:
    load, nxt = xs[0], xs[1]
    length = load.u32(4) or 0
    full = 4 if family == 4 else 16
    if nxt.name == "bitwise":
        mask, cmp = nxt.data(4), xs[2]
        prefix = bin(int.from_bytes(mask, "big")).count("1")
        value = f"{_address(cmp.data(3), family)}/{prefix}"
        return ir.Match(key, value, cmp.u32(2) == 1), 3
    raw = nxt.data(3)
    value = _address(raw, family)
    if length < full:
        value = f"{value}/{length * 8}"
    return ir.Match(key, value, nxt.u32(2) == 1), 2


def _after_load(xs: list[Expr], family: int) -> tuple[ir.Statement, int]:
    """A statement that starts by loading a packet field: a match, a lookup or an update."""
    loads: list[ir.Key] = []
    while len(loads) < len(xs) and (key := _load_key(xs[len(loads)], family)) is not None:
        loads.append(key)
    if not loads:
        raise Undecodable(f"expression {xs[0].name}")
    nxt = xs[len(loads)] if len(loads) < len(xs) else None
    if nxt is not None and nxt.name == "lookup":
        name = text_of(nxt.attrs.get(1, b""))
        stmt: ir.Statement = (
            ir.Vmap(tuple(loads), name) if 3 in nxt.attrs else ir.Lookup(tuple(loads), name)
        )
        return stmt, len(loads) + 1
    if nxt is not None and nxt.name == "dynset" and len(loads) == 1:
        return ir.Update(text_of(nxt.attrs.get(1, b"")), loads[0]), 2
    if len(loads) != 1 or nxt is None:
        raise Undecodable("a load without a comparison")
    key = loads[0]
    if key in (ir.Key.SADDR, ir.Key.DADDR):
        return _address_match(key, xs, family)
    if nxt.name != "cmp":
        raise Undecodable(f"{key.value} followed by {nxt.name}")
    negate, raw = nxt.u32(2) == 1, nxt.data(3)
    if key is ir.Key.L4PROTO:
        proto = _PROTOCOL_NAMES.get(raw[0] if raw else 0, str(raw[0] if raw else 0))
        rest = xs[2:4]
        if (
            not negate
            and len(rest) == 2
            and _load_key(rest[0], family) is ir.Key.DPORT
            and rest[1].name == "cmp"
            and rest[1].u32(2) == 0
        ):
            return ir.PortMatch(proto, int.from_bytes(rest[1].data(3), "big")), 4
        return ir.Match(key, proto, negate), 2
    if key is ir.Key.DPORT:
        return ir.Match(key, str(int.from_bytes(raw, "big")), negate), 2
    name = raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
    return ir.Match(key, name if len(raw) == 16 else name + "+", negate), 2


def _host32(raw: bytes) -> int:
    return int(struct.unpack("=I", raw[:4].ljust(4, b"\0"))[0])


def _one(xs: list[Expr], family: int) -> tuple[ir.Statement, int]:
    """The statement at the start of `xs`, and how many expressions it took."""
    x = xs[0]
    names = [y.name for y in xs[:3]]
    if x.name == "immediate" and x.u32(1) == REG_VERDICT:
        inner = dict(iter_attrs(x.attrs.get(2, b""))).get(2, b"")
        return decode_verdict(inner), 1
    if x.name == "immediate" and names[1:3] == ["immediate", "nat"]:
        return ir.Dnat(_address(x.data(2), family), int.from_bytes(xs[1].data(2), "big")), 3
    if x.name == "reject":
        return ir.Reject(), 1
    if x.name == "masq":
        return ir.Masquerade(), 1
    if names == ["ct", "bitwise", "cmp"]:
        return ir.CtStateNew(), 3
    if names[:2] == ["fib", "cmp"]:
        return ir.FibLocal(ir.Key.SADDR if x.u32(3) == 1 else ir.Key.DADDR), 2
    if names[:2] == ["numgen", "cmp"]:
        return ir.NumgenZero(x.u32(2) or 0), 2
    if _is_mark_load(x) and names[1:3] == ["bitwise", "cmp"]:
        return ir.MarkClear(_host32(xs[1].data(4))), 3
    if _is_mark_load(x) and names[1:3] == ["bitwise", "meta"]:
        mask, xor = _host32(xs[1].data(4)), _host32(xs[1].data(5))
        return (ir.MarkSet("^", xor) if mask == 0xFFFFFFFF else ir.MarkSet("|", xor)), 3
    return _after_load(xs, family)


def decode_rule(exprs: bytes, udata: bytes, family: int) -> ir.Rule:
    """The rule whose encoding is exactly these bytes, or Undecodable."""
    parsed = parse_exprs(exprs)
    statements: list[ir.Statement] = []
    i = 0
    try:
        while i < len(parsed):
            stmt, used = _one(parsed[i:], family)
            statements.append(stmt)
            i += used
    except (IndexError, KeyError, ValueError, struct.error) as exc:
        raise Undecodable(str(exc)) from None
    rule = ir.Rule(tuple(statements), udata_comment(udata, 0))
    if e.encode_rule(rule, family) != (exprs, udata):
        raise Undecodable("not one of kproxy's encodings")
    return rule


def udata_comment(udata: bytes, kind: int) -> str | None:
    """The comment in nft's user-data TLVs (kind, length, value)."""
    offset = 0
    while offset + 2 <= len(udata):
        tlv_kind, length = udata[offset], udata[offset + 1]
        value = udata[offset + 2 : offset + 2 + length]
        if tlv_kind == kind:
            return text_of(value)
        offset += 2 + length
    return None


def decode_chain(attrs: dict[int, bytes], rules: tuple[ir.Rule, ...]) -> ir.Chain:
    hook = None
    if 4 in attrs:
        nested = dict(iter_attrs(attrs[4]))
        number = int(struct.unpack(">I", nested[1][:4])[0])
        priority = int(struct.unpack(">i", nested[2][:4])[0])
        hook = ir.Hook(
            text_of(attrs.get(7, b"filter")), _HOOK_NAMES.get(number, str(number)), priority
        )
    comment = udata_comment(attrs.get(12, b""), 0)
    return ir.Chain(text_of(attrs[3]), rules, hook, comment)


def key_types(kind: int) -> tuple[str, ...]:
    """A set's key type: the datatypes of a concatenation, 6 bits each."""
    types: list[str] = []
    while kind:
        number = kind & 0x3F
        types.insert(0, _DATATYPE_NAMES.get(number, str(number)))
        kind >>= 6
    return tuple(types)


def decode_set(attrs: dict[int, bytes]) -> ir.NamedSet:
    flags = int(struct.unpack(">I", attrs.get(3, bytes(4))[:4])[0])
    names = tuple(name for name, bit in e.SET_FLAG_BITS.items() if flags & bit)
    timeout = attrs.get(11)
    size = dict(iter_attrs(attrs.get(9, b""))).get(1)
    udata = attrs.get(13, b"")
    prefix = e.set_udata_prefix(bool(flags & e.SET_MAP_BIT))
    return ir.NamedSet(
        name=text_of(attrs[2]),
        key_types=key_types(int(struct.unpack(">I", attrs[4][:4])[0])),
        verdict_map=bool(flags & e.SET_MAP_BIT),
        flags=names,
        timeout=int(struct.unpack(">Q", timeout[:8])[0]) // 1000 if timeout else None,
        size=int(struct.unpack(">I", size[:4])[0]) if size else None,
        comment=udata_comment(udata.removeprefix(prefix), e.SET_COMMENT_UDATA),
    )


def decode_key(raw: bytes, types: tuple[str, ...]) -> tuple[str, ...]:
    """An element's key bytes as the IR writes the key (fields padded to 4 in a concatenation)."""
    parts: list[str] = []
    offset = 0
    for name in types:
        size = e.DATATYPES[name][1] if name in e.DATATYPES else 4
        value = raw[offset : offset + size]
        if name in ("ipv4_addr", "ipv6_addr"):
            parts.append(str(ipaddress.ip_address(value)))
        elif name == "inet_proto":
            parts.append(_PROTOCOL_NAMES.get(value[0], str(value[0])))
        else:
            parts.append(str(int.from_bytes(value, "big")))
        offset += (size + 3) & ~3 if len(types) > 1 else size
    return tuple(parts)


def decode_element(raw_key: bytes, data: bytes, named: ir.NamedSet) -> ir.Element:
    verdict = None
    if named.verdict_map:
        verdict = decode_verdict(dict(iter_attrs(data)).get(2, b""))
    return ir.Element(decode_key(raw_key, named.key_types), verdict)
