"""The nftables fake's ruleset: tables, chains, rules, sets and elements held as the bytes the
messages carried, and each message of a batch executed against them with the kernel's refusals
(see fake.py)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy.dataplane.nftables.netlink import (
    NFNL_SUBSYS_NFTABLES,
    NLM_F_APPEND,
    NLM_F_EXCL,
    Message,
    iter_attrs,
)

NEWTABLE, GETTABLE, DELTABLE = 0, 1, 2
NEWCHAIN, GETCHAIN, DELCHAIN = 3, 4, 5
NEWRULE, GETRULE, DELRULE = 6, 7, 8
NEWSET, GETSET, DELSET = 9, 10, 11
NEWSETELEM, GETSETELEM, DELSETELEM = 12, 13, 14
NEWGEN, GETGEN = 15, 16
JUMP_CODES = (-3, -4)  # NFT_JUMP, NFT_GOTO
SET_MAP = 0x8
SET_EVAL = 0x20
_SET_ID = 10  # NFTA_SET_ID: the transaction's handle of a new set, never dumped
U32 = struct.Struct(">I")


class Refused(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(f"{errno.errorcode[code]}: {why}")
        self.code = code


@dataclass
class FakeChain:
    handle: int
    attrs: dict[int, bytes]  # as defined (hook, type, policy, user data), names excluded
    rules: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # handle, exprs, udata

    @property
    def base(self) -> bool:
        return 4 in self.attrs


@dataclass
class FakeSet:
    handle: int
    attrs: dict[int, bytes]
    elements: dict[bytes, bytes] = field(default_factory=dict)  # key -> NFTA_SET_ELEM_DATA

    @property
    def key_len(self) -> int:
        return int(U32.unpack(self.attrs[5][:4])[0])

    @property
    def verdict_map(self) -> bool:
        return bool(int(U32.unpack(self.attrs.get(3, bytes(4))[:4])[0]) & SET_MAP)


@dataclass
class FakeTable:
    handle: int
    attrs: dict[int, bytes]
    chains: dict[str, FakeChain] = field(default_factory=dict)
    sets: dict[str, FakeSet] = field(default_factory=dict)
    next_handle: int = 0

    def take_handle(self) -> int:
        self.next_handle += 1
        return self.next_handle


Tables = dict[tuple[int, str], FakeTable]  # (nfproto family, name) -> table


def text(value: bytes) -> str:
    return value.rstrip(b"\0").decode("utf-8", "surrogateescape")


def string(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape") + b"\0"


def attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("<HH", length, kind) + data + bytes(-length % 4)


def _verdict(data: bytes) -> tuple[int, str | None]:
    """An NFTA_DATA nest's verdict: code and chain (code 0 and None when it holds none)."""
    inner = dict(iter_attrs(dict(iter_attrs(data)).get(2, b"")))
    code = struct.unpack(">i", inner.get(1, bytes(4))[:4])[0]
    return code, text(inner[2]) if 2 in inner else None


def _expressions(exprs: bytes) -> Iterator[tuple[str, dict[int, bytes]]]:
    for _kind, element in iter_attrs(exprs):
        attrs = dict(iter_attrs(element))
        yield text(attrs.get(1, b"")), dict(iter_attrs(attrs.get(2, b"")))


def rule_targets(exprs: bytes) -> tuple[set[str], set[str]]:
    """The chains a rule jumps or goes to, and the sets it looks up or updates."""
    chains: set[str] = set()
    sets: set[str] = set()
    for name, data in _expressions(exprs):
        if name == "immediate" and 2 in data:
            code, chain = _verdict(data[2])
            if code in JUMP_CODES and chain is not None:
                chains.add(chain)
        elif name in ("lookup", "dynset") and 1 in data:
            sets.add(text(data[1]))
    return chains, sets


def element_target(data: bytes) -> str | None:
    code, chain = _verdict(data)
    return chain if code in JUMP_CODES else None


def chain_edges(table: FakeTable) -> dict[str, set[str]]:
    """Which chains each chain (its rules, and the verdict maps its rules look up) leads to."""
    maps = {
        name: {t for data in s.elements.values() if (t := element_target(data))}
        for name, s in table.sets.items()
        if s.verdict_map
    }
    edges: dict[str, set[str]] = {}
    for name, chain in table.chains.items():
        out = edges.setdefault(name, set())
        for _handle, exprs, _udata in chain.rules:
            targets, sets = rule_targets(exprs)
            out |= targets
            for set_name in sets:
                out |= maps.get(set_name, set())
    return edges


def has_loop(table: FakeTable) -> bool:
    """Whether a base chain reaches a loop of jumps (the kernel refuses the commit)."""
    edges = chain_edges(table)
    done: set[str] = set()

    def visit(chain: str, path: set[str]) -> bool:
        if chain in path:
            return True
        if chain in done:
            return False
        found = any(visit(t, path | {chain}) for t in edges.get(chain, ()))
        done.add(chain)
        return found

    return any(visit(name, set()) for name, c in table.chains.items() if c.base)


# --- executing one message of a batch ------------------------------------------------------


def _find_table(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> FakeTable:
    table = tables.get((msg.family, text(attrs.get(1, b""))))
    if table is None:
        raise Refused(errno.ENOENT, f"no table {text(attrs.get(1, b''))}")
    return table


def find_chain(table: FakeTable, name: str) -> FakeChain:
    chain = table.chains.get(name)
    if chain is None:
        raise Refused(errno.ENOENT, f"no chain {name}")
    return chain


def find_set(table: FakeTable, name: str) -> FakeSet:
    found = table.sets.get(name)
    if found is None:
        raise Refused(errno.ENOENT, f"no set {name}")
    return found


def _check_jump(table: FakeTable, target: str) -> None:
    if find_chain(table, target).base:
        raise Refused(errno.EOPNOTSUPP, f"a jump to base chain {target}")


def execute(tables: Tables, msg: Message) -> None:
    kind = msg.type & 0xFF
    if msg.type >> 8 != NFNL_SUBSYS_NFTABLES or kind not in _HANDLERS:
        raise Refused(errno.EOPNOTSUPP, f"message type {msg.type:#x}")
    _HANDLERS[kind](tables, msg, dict(iter_attrs(msg.attrs)))


def _new_table(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    key = (msg.family, text(attrs[1]))
    if key in tables:
        if msg.flags & NLM_F_EXCL:
            raise Refused(errno.EEXIST, f"table {key[1]} exists")
        return
    tables[key] = FakeTable(len(tables) + 1, {k: v for k, v in attrs.items() if k != 1})


def _del_table(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    _find_table(tables, msg, attrs)
    del tables[(msg.family, text(attrs[1]))]


def _new_chain(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    name = text(attrs[3])
    existing = table.chains.get(name)
    if existing is not None:
        if msg.flags & NLM_F_EXCL:
            raise Refused(errno.EEXIST, f"chain {name} exists")
        hooked = [attrs.get(k) for k in (4, 7)]
        if 4 in attrs and hooked != [existing.attrs.get(k) for k in (4, 7)]:
            raise Refused(errno.EOPNOTSUPP, f"chain {name} exists with another hook")
        return
    kept = {k: v for k, v in attrs.items() if k not in (1, 2, 3)}
    table.chains[name] = FakeChain(table.take_handle(), kept)


def _users_of_chain(table: FakeTable, name: str) -> list[str]:
    users = [
        f"a rule of {other}"
        for other, chain in table.chains.items()
        if other != name and any(name in rule_targets(r[1])[0] for r in chain.rules)
    ]
    users += [
        f"an element of {set_name}"
        for set_name, s in table.sets.items()
        if any(element_target(data) == name for data in s.elements.values())
    ]
    return users


def _del_chain(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    name = text(attrs.get(3, b""))
    find_chain(table, name)
    users = _users_of_chain(table, name)
    if users:
        raise Refused(errno.EBUSY, f"chain {name} is used by {users[0]}")
    del table.chains[name]  # its own rules go with it, as in the kernel


def _new_rule(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    chain = find_chain(table, text(attrs.get(2, b"")))
    exprs = attrs.get(4, b"")
    targets, sets = rule_targets(exprs)
    for target in sorted(targets):
        _check_jump(table, target)
    for set_name in sorted(sets):
        find_set(table, set_name)
    rule = (table.take_handle(), exprs, attrs.get(7, b""))
    if msg.flags & NLM_F_APPEND:
        chain.rules.append(rule)
    else:
        chain.rules.insert(0, rule)


def _del_rule(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    if 2 not in attrs:
        for chain in table.chains.values():
            chain.rules.clear()
        return
    chain = find_chain(table, text(attrs[2]))
    if 3 not in attrs:
        chain.rules.clear()
        return
    handle = int.from_bytes(attrs[3][:8], "big")
    kept = [r for r in chain.rules if r[0] != handle]
    if len(kept) == len(chain.rules):
        raise Refused(errno.ENOENT, f"no rule {handle} in chain {text(attrs[2])}")
    chain.rules = kept


def _new_set(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    name = text(attrs[2])
    existing = table.sets.get(name)
    if existing is not None:
        if msg.flags & NLM_F_EXCL:
            raise Refused(errno.EEXIST, f"set {name} exists")
        if _definition(attrs) != _definition(existing.attrs):
            raise Refused(errno.EEXIST, f"set {name} exists with another definition")
        return
    kept = {k: v for k, v in attrs.items() if k not in (1, 2, _SET_ID)}
    table.sets[name] = FakeSet(table.take_handle(), kept)


def _definition(attrs: dict[int, bytes]) -> tuple[bytes, ...]:
    """A set's flags, key type and length, data type and timeout (no flags: zero)."""
    return tuple(attrs.get(k, bytes(4) if k == 3 else b"") for k in (3, 4, 5, 6, 11))


def _del_set(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    name = text(attrs.get(2, b""))
    find_set(table, name)
    for chain_name, chain in table.chains.items():
        if any(name in rule_targets(r[1])[1] for r in chain.rules):
            raise Refused(errno.EBUSY, f"set {name} is used by a rule of {chain_name}")
    del table.sets[name]


def _elements(attrs: dict[int, bytes]) -> Iterator[tuple[bytes, bytes | None]]:
    for _kind, element in iter_attrs(attrs.get(3, b"")):
        parts = dict(iter_attrs(element))
        key = dict(iter_attrs(parts.get(1, b""))).get(1, b"")
        yield key, parts.get(2)


def _new_elements(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    named = find_set(table, text(attrs.get(2, b"")))
    for key, data in _elements(attrs):
        if len(key) != named.key_len:
            raise Refused(errno.EINVAL, f"a key of {len(key)} bytes, the set's are {named.key_len}")
        if (data is None) == named.verdict_map:
            raise Refused(errno.EINVAL, "an element's data does not fit the set")
        target = element_target(data) if data is not None else None
        if target is not None:
            _check_jump(table, target)
        if key in named.elements:
            if msg.flags & NLM_F_EXCL:
                raise Refused(errno.EEXIST, f"element {key.hex()} exists")
            if named.elements[key] != (data or b""):
                raise Refused(errno.EEXIST, f"element {key.hex()} exists with other data")
        named.elements[key] = data or b""


def _del_elements(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    named = find_set(table, text(attrs.get(2, b"")))
    for key, _data in _elements(attrs):
        if named.elements.pop(key, None) is None:
            raise Refused(errno.ENOENT, f"no element {key.hex()}")


_HANDLERS = {
    NEWTABLE: _new_table,
    DELTABLE: _del_table,
    NEWCHAIN: _new_chain,
    DELCHAIN: _del_chain,
    NEWRULE: _new_rule,
    DELRULE: _del_rule,
    NEWSET: _new_set,
    DELSET: _del_set,
    NEWSETELEM: _new_elements,
    DELSETELEM: _del_elements,
}
