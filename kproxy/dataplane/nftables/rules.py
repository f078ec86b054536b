"""A rule's expressions and comment as the kernel receives them, encoded per rule shape.

Most of a large table's rules differ from many others only in an address, a port or a chain
name: an endpoint chain's `ip saddr EP jump mark-for-masquerade` and `meta l4proto tcp dnat to
EP:PORT`, a service chain's `numgen random mod N 0 goto endpoint-...`. So a rule is split into
its shape (the statements with those values taken out, the family and the comment) and the
values' bytes; the general encoder (statements.py) encodes each shape once with probe values
(templates.spliced locates where each value goes), and every rule of that shape is its
template filled with its values. A shape whose values are not each one plain run of bytes is
encoded by the general encoder every time. tests/nftables/test_nftables_rule_shapes.py checks
the two paths against each other for every rule the planner makes."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain as chained
from typing import Any

from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg

from kproxy.dataplane.nftables.statements import encode_statement
from kproxy.dataplane.nftables.templates import (
    RULE,
    EncodingError,
    Spliced,
    attr,
    name_bytes,
    payload_of,
    probe_text,
    pyroute2_attrs,
    spliced,
)
from kproxy.plan.nftables.ir import Dnat, Key, Match, Rule, Statement, Update, Verdict

COMMENT_LIMIT = 250  # nft keeps a comment in one user-data record (at most 255 bytes)
SHAPES_MAX = 4096  # distinct shapes kept (a table has a few dozen; CIDR matches add some)

_EXPRESSIONS = RULE["NFTA_RULE_EXPRESSIONS"]
_USERDATA = RULE["NFTA_RULE_USERDATA"]
_ADDRESS_KEYS = (Key.SADDR, Key.DADDR)
_INET = {4: socket.AF_INET, 6: socket.AF_INET6}
_PORT = struct.Struct(">H")
# Shape markers of the statements whose values are taken out.
_VERDICT = "verdict"
_ADDRESS = "address"
_DNAT = "dnat"
_UPDATE = "update"


@lru_cache(maxsize=64)
def _comment_template(size: int) -> Spliced:
    return spliced(
        lambda v: payload_of(pyroute2_attrs(nft_rule_msg, [("NFTA_RULE_USERDATA", probe_text(v))])),
        size,
    )


def comment_udata(value: str) -> bytes:
    """A comment as the user-data record nft writes (the attribute's payload)."""
    raw = name_bytes(value[:COMMENT_LIMIT])
    return _comment_template(len(raw)).around(raw)


def general_rule(rule: Rule, family: int) -> tuple[bytes, bytes]:
    """(expressions, user data) of a rule, statement by statement: the reference encoding."""
    exprs = b"".join([encode_statement(s, family) for s in rule.statements])
    udata = comment_udata(rule.comment) if rule.comment else b""
    return exprs, udata


def rule_body(exprs: bytes, udata: bytes) -> bytes:
    """A rule message's expressions and comment attributes (after its table and chain)."""
    return attr(_EXPRESSIONS, exprs) + (attr(_USERDATA, udata) if udata else b"")


@dataclass(frozen=True, slots=True)
class RuleTemplate:
    """One shape's expressions, and its whole body (expressions and comment attributes), with
    the values cut out; the user data, which is the shape's own."""

    exprs: Spliced
    body: Spliced
    udata: bytes


Shape = tuple[Any, ...]
_KEYS = tuple(Key)
# The statements without values, by number: a shape holds their numbers, which hash and compare
# as ints (a statement's own hash is Python code, run for each rule). Found by identity first:
# the planner shares such statements between rules.
_CODES: dict[Statement, int] = {}
_BY_CODE: list[Statement] = []
_BY_ID: dict[int, tuple[Statement, int]] = {}  # holds the statements: their ids stay theirs


def _code(s: Statement) -> int:
    found = _BY_ID.get(id(s))
    if found is not None and found[0] is s:
        return found[1]
    code = _CODES.get(s)
    if code is None:
        code = len(_BY_CODE)
        if code >= SHAPES_MAX:
            return -1  # too many: this rule goes through the general encoder
        _CODES[s] = code
        _BY_CODE.append(s)
    if len(_BY_ID) < SHAPES_MAX:
        _BY_ID[id(s)] = (s, code)
    return code


def split_rule(rule: Rule, family: int) -> tuple[Shape, list[bytes]] | None:
    """A rule's shape and the bytes of the values taken out of it, in order (None: a rule
    for the general encoder)."""
    shape: list[Any] = [family, rule.comment]
    values: list[bytes] = []
    for s in rule.statements:
        if type(s) is Verdict:
            if s.chain is None:
                shape.append(s)
                continue
            raw = name_bytes(s.chain)
            shape.append((_VERDICT, s.kind, len(raw)))
            values.append(raw)
        elif type(s) is Match and s.key in _ADDRESS_KEYS and "/" not in s.value:
            shape.append((_ADDRESS, _KEYS.index(s.key), s.negate))
            values.append(socket.inet_pton(_INET[family], s.value))
        elif type(s) is Dnat:
            shape.append((_DNAT,))
            values.append(socket.inet_pton(_INET[family], s.ip))
            values.append(_PORT.pack(s.port))
        elif type(s) is Update:
            raw = name_bytes(s.set_name)
            shape.append((_UPDATE, _KEYS.index(s.key), len(raw)))
            values.append(raw)
        else:
            code = _code(s)
            if code < 0:
                return None
            shape.append(code)
    return tuple(shape), values


def _rebuild(shape: Shape, values: tuple[bytes, ...]) -> Rule:
    """The rule of `shape` holding `values` (the probes a template is located with)."""
    family, comment = shape[0], shape[1]
    pending = iter(values)
    statements: list[Statement] = []
    for part in shape[2:]:
        if type(part) is int:
            statements.append(_BY_CODE[part])
        elif type(part) is not tuple:
            statements.append(part)  # a verdict without a chain
        elif part[0] == _DNAT:
            ip = socket.inet_ntop(_INET[family], next(pending))
            statements.append(Dnat(ip, _PORT.unpack(next(pending))[0]))
        elif part[0] == _VERDICT:
            statements.append(Verdict(part[1], probe_text(next(pending))))
        elif part[0] == _ADDRESS:
            ip = socket.inet_ntop(_INET[family], next(pending))
            statements.append(Match(_KEYS[part[1]], ip, part[2]))
        else:
            statements.append(Update(probe_text(next(pending)), _KEYS[part[1]]))
    return Rule(tuple(statements), comment)


def _sizes(shape: Shape) -> list[int]:
    address = 4 if shape[0] == 4 else 16
    sizes: list[int] = []
    for part in shape[2:]:
        if type(part) is not tuple:
            continue
        if part[0] == _DNAT:
            sizes += [address, 2]
        elif part[0] == _ADDRESS:
            sizes.append(address)
        else:
            sizes.append(part[2])
    return sizes


def build_template(shape: Shape) -> RuleTemplate | None:
    """The shape's template, located by encoding it with probes through the general encoder;
    None when its values are not each one plain run of bytes (or a probe is no valid value)."""
    family = shape[0]
    sizes = _sizes(shape)
    try:
        exprs = spliced(lambda *v: general_rule(_rebuild(shape, v), family)[0], *sizes)
    except (EncodingError, OSError, ValueError):
        return None
    udata = comment_udata(shape[1]) if shape[1] else b""
    parts = exprs.parts
    length = sum(map(len, parts)) + sum(sizes)
    head = attr(_EXPRESSIONS, bytes(length))[:4]
    tail = attr(_USERDATA, udata) if udata else b""
    body: tuple[bytes, ...] = (head + parts[0] + tail,)
    if len(parts) > 1:
        body = (head + parts[0], *parts[1:-1], parts[-1] + tail)
    return RuleTemplate(exprs, Spliced(body), udata)


_TEMPLATES: dict[Shape, RuleTemplate | None] = {}


def _template(shape: Shape) -> RuleTemplate | None:
    try:
        return _TEMPLATES[shape]
    except KeyError:
        pass
    template = build_template(shape)
    if len(_TEMPLATES) < SHAPES_MAX:
        _TEMPLATES[shape] = template
    return template


def _fill(parts: tuple[bytes, ...], values: list[bytes]) -> bytes:
    if not values:
        return parts[0]
    if len(values) == 1:
        return parts[0] + values[0] + parts[1]
    return b"".join(chained.from_iterable(zip(parts[:-1], values, strict=True))) + parts[-1]


def encode_rule(rule: Rule, family: int) -> tuple[bytes, bytes]:
    """(expressions, user data) of a rule: the parts a dump of it returns."""
    split = split_rule(rule, family)
    template = None if split is None else _template(split[0])
    if template is None or split is None:
        return general_rule(rule, family)
    return _fill(template.exprs.parts, split[1]), template.udata


def encode_rule_body(rule: Rule, family: int) -> bytes:
    """A rule message's expressions and comment attributes."""
    split = split_rule(rule, family)
    template = None if split is None else _template(split[0])
    if template is None or split is None:
        return rule_body(*general_rule(rule, family))
    return _fill(template.body.parts, split[1])
