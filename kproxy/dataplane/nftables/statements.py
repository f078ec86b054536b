"""The IR's statements as nf_tables expressions, in the kernel's canonical form (the order, and
the defaults, that the kernel dumps them back in): what a rule's expression list holds."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from kproxy.dataplane.nftables import expressions as x
from kproxy.dataplane.nftables.templates import name_bytes
from kproxy.plan.nftables import ir

_ICMP_PORT_UNREACH = {4: 3, 6: 4}
# pyroute2 declares NFTA_FIB_RESULT as flags; the kernel's value is an enum, and its "address
# type" (3) is given here as the two lowest flags.
_FIB_RESULT_ADDRTYPE = {"NFT_FIB_RESULT_UNSPEC", "NFT_FIB_RESULT_OIF"}


def _field(key: ir.Key, family: int) -> tuple[int, int]:
    """(network header offset, length) of an address field."""
    if family == 4:
        return (12 if key is ir.Key.SADDR else 16), 4
    return (8 if key is ir.Key.SADDR else 24), 16


def _load(key: ir.Key, family: int, dreg: int) -> tuple[bytes, int]:
    """The expression loading `key` into `dreg`, and the field's length."""
    if key in (ir.Key.SADDR, ir.Key.DADDR):
        offset, length = _field(key, family)
        return x.payload(dreg, 1, offset, length), length
    if key is ir.Key.L4PROTO:
        return x.meta_load(16, dreg), 1
    if key is ir.Key.DPORT:
        return x.payload(dreg, 2, 2, 2), 2
    return x.meta_load(6, dreg), 16  # IIFNAME


def _load_keys(keys: tuple[ir.Key, ...], family: int) -> bytes:
    """Load a concatenation into consecutive 32-bit registers, each field rounded up to 4
    bytes. A register on a 16-byte boundary goes by its 16-byte name, as the kernel dumps it."""
    out = []
    offset = 0
    for key in keys:
        index = offset // 4
        dreg = index // 4 + x.REG_1 if index % 4 == 0 else x.REG32_00 + index
        expr, length = _load(key, family, dreg)
        out.append(expr)
        offset += (length + 3) & ~3
    return b"".join(out)


def _address_match(key: ir.Key, value: str, family: int, op: int) -> bytes:
    offset, length = _field(key, family)
    if "/" not in value:  # one address: the common case, without ipaddress's parsing
        packed = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, value)
        return x.payload(x.REG_1, 1, offset, length) + x.cmp(op, packed)
    return _cidr_match(key, value, family, op)


@lru_cache(maxsize=4096)
def _cidr_match(key: ir.Key, value: str, family: int, op: int) -> bytes:
    offset, length = _field(key, family)
    net = ipaddress.ip_network(value, strict=False)
    packed = net.network_address.packed
    prefix = net.prefixlen
    if prefix == net.max_prefixlen:
        return x.payload(x.REG_1, 1, offset, length) + x.cmp(op, packed)
    if prefix % 8 == 0:
        size = prefix // 8
        return x.payload(x.REG_1, 1, offset, size) + x.cmp(op, packed[:size])
    mask = net.netmask.packed
    return (
        x.payload(x.REG_1, 1, offset, length) + x.bitwise(mask, bytes(length)) + x.cmp(op, packed)
    )


def _iifname(value: str) -> bytes:
    if value.endswith("+"):
        return value[:-1].encode()
    return value.encode().ljust(16, b"\0")[:16]


def _match(stmt: ir.Match, family: int) -> bytes:
    op = 1 if stmt.negate else 0
    if stmt.key in (ir.Key.SADDR, ir.Key.DADDR):
        return _address_match(stmt.key, stmt.value, family, op)
    if stmt.key is ir.Key.L4PROTO:
        return x.meta_load(16, x.REG_1) + x.cmp(op, bytes([x.PROTOCOLS[stmt.value]]))
    if stmt.key is ir.Key.DPORT:
        return x.payload(x.REG_1, 2, 2, 2) + x.cmp(op, struct.pack(">H", int(stmt.value)))
    return x.meta_load(6, x.REG_1) + x.cmp(op, _iifname(stmt.value))


def _port_match(stmt: ir.PortMatch, family: int) -> bytes:
    return (
        x.meta_load(16, x.REG_1)
        + x.cmp(0, bytes([x.PROTOCOLS[stmt.proto]]))
        + x.payload(x.REG_1, 2, 2, 2)
        + x.cmp(0, struct.pack(">H", stmt.port))
    )


def _ct_state_new(stmt: ir.CtStateNew, family: int) -> bytes:
    ct = x.expression("ct", [("NFTA_CT_DREG", x.REG_1), ("NFTA_CT_KEY", 0)])  # state
    return ct + x.bitwise(x.host32(8), bytes(4)) + x.cmp(1, bytes(4))


def _fib_local(stmt: ir.FibLocal, family: int) -> bytes:
    fib = x.expression(
        "fib",
        [
            ("NFTA_FIB_DREG", x.REG_1),
            ("NFTA_FIB_RESULT", _FIB_RESULT_ADDRTYPE),
            ("NFTA_FIB_FLAGS", 1 if stmt.key is ir.Key.SADDR else 2),
        ],
    )
    return fib + x.cmp(0, x.host32(2))  # RTN_LOCAL


def _mark_clear(stmt: ir.MarkClear, family: int) -> bytes:
    return x.meta_load(3, x.REG_1) + x.bitwise(x.host32(stmt.mask), bytes(4)) + x.cmp(0, bytes(4))


def _numgen_zero(stmt: ir.NumgenZero, family: int) -> bytes:
    numgen = x.expression(
        "numgen",
        [
            ("NFTA_NG_DREG", x.REG_1),
            ("NFTA_NG_MODULUS", stmt.modulus),
            ("NFTA_NG_TYPE", 1),  # random
            ("NFTA_NG_OFFSET", 0),
        ],
    )
    return numgen + x.cmp(0, bytes(4))


def _set_lookup(stmt: ir.Lookup, family: int) -> bytes:
    return _load_keys(stmt.keys, family) + x.lookup(stmt.set_name, verdict=False)


def _map_lookup(stmt: ir.Vmap, family: int) -> bytes:
    return _load_keys(stmt.keys, family) + x.lookup(stmt.map_name, verdict=True)


def _reject(stmt: ir.Reject, family: int) -> bytes:
    return x.expression(
        "reject", [("NFTA_REJECT_TYPE", 0), ("NFTA_REJECT_ICMP_CODE", _ICMP_PORT_UNREACH[family])]
    )


def _dnat(stmt: ir.Dnat, family: int) -> bytes:
    address = socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, stmt.ip)
    return (
        x.immediate(x.REG_1, address)
        + x.immediate(x.REG_2, struct.pack(">H", stmt.port))
        + x.nat(family)
    )


def _masquerade(stmt: ir.Masquerade, family: int) -> bytes:
    return x.expression("masq", [("NFTA_MASQ_FLAGS", {"NF_NAT_RANGE_PROTO_RANDOM_FULLY"})])


def _mark_set(stmt: ir.MarkSet, family: int) -> bytes:
    mask, xor = (~stmt.value, stmt.value) if stmt.op == "|" else (0xFFFFFFFF, stmt.value)
    return (
        x.meta_load(3, x.REG_1)
        + x.bitwise(x.host32(mask), x.host32(xor))
        + x.expression("meta", [("NFTA_META_KEY", 3), ("NFTA_META_SREG", x.REG_1)])
    )


def _update(stmt: ir.Update, family: int) -> bytes:
    load, _length = _load(stmt.key, family, x.REG_1)
    name = name_bytes(stmt.set_name)
    return load + x.dynset_template(len(name)).around(name)


def _verdict(stmt: ir.Verdict, family: int) -> bytes:
    return x.encode_verdict(stmt)


# Statements that carry an address, a port or a chain name are filled in per rule; the others
# are the same in many rules, and encoded once.
_PER_RULE: dict[type, Callable[[Any, int], bytes]] = {
    ir.Match: _match,
    ir.Verdict: _verdict,
    ir.Dnat: _dnat,
    ir.Update: _update,
}
_SHARED: dict[type, Callable[[Any, int], bytes]] = {
    ir.PortMatch: _port_match,
    ir.CtStateNew: _ct_state_new,
    ir.FibLocal: _fib_local,
    ir.MarkClear: _mark_clear,
    ir.NumgenZero: _numgen_zero,
    ir.Lookup: _set_lookup,
    ir.Vmap: _map_lookup,
    ir.Reject: _reject,
    ir.Masquerade: _masquerade,
    ir.MarkSet: _mark_set,
}


@lru_cache(maxsize=4096)
def _shared_statement(stmt: ir.Statement, family: int) -> bytes:
    return _SHARED[type(stmt)](stmt, family)


def encode_statement(stmt: ir.Statement, family: int) -> bytes:
    """One statement as the expressions that do it."""
    per_rule = _PER_RULE.get(type(stmt))
    if per_rule is not None:
        return per_rule(stmt, family)
    if type(stmt) not in _SHARED:
        raise TypeError(f"unknown statement {stmt!r}")
    return _shared_statement(stmt, family)
