"""The nftables fake's answers to dumps and gets: what it holds, as the kernel dumps it (the
attributes in the kernel's order, with its handles, use counts and rule positions)."""

from __future__ import annotations

import errno
import struct
from collections import Counter

from kproxy.dataplane.nftables.fake_ruleset import (
    GETCHAIN,
    GETGEN,
    GETRULE,
    GETSET,
    GETSETELEM,
    GETTABLE,
    SET_EVAL,
    U32,
    FakeChain,
    FakeSet,
    FakeTable,
    Refused,
    Tables,
    attr,
    element_target,
    find_set,
    rule_targets,
    string,
    text,
)


def _handle(value: int) -> bytes:
    return struct.pack(">Q", value)


def _ordered(attrs: dict[int, bytes], order: tuple[int, ...]) -> bytes:
    return b"".join(attr(k, attrs[k]) for k in order if k in attrs)


_TABLE_ORDER = (1, 3, 4, 2, 6)  # name, use, handle, flags, user data
_CHAIN_ORDER = (1, 3, 2, 4, 5, 7, 10, 6, 12)  # table, name, handle, hook, policy, type, flags, use
_SET_ORDER = (1, 2, 16, 3, 4, 5, 6, 7, 11, 12, 13, 9, 20)  # ..., handle, ..., user data, desc


def _chain_attrs(table_name: str, name: str, chain: FakeChain, refs: int) -> bytes:
    attrs = {
        **chain.attrs,
        1: string(table_name),
        2: _handle(chain.handle),
        3: string(name),
        6: U32.pack(refs),
    }
    if chain.base:
        attrs[10] = U32.pack(1)  # NFT_CHAIN_BASE
    return _ordered(attrs, _CHAIN_ORDER)


def _references(table: FakeTable) -> Counter[str]:
    """How many rules and elements jump or go to each chain (its `use`, with its own rules)."""
    refs: Counter[str] = Counter()
    for chain in table.chains.values():
        for _handle, exprs, _udata in chain.rules:
            refs.update(rule_targets(exprs)[0])
    for s in table.sets.values():
        refs.update(t for data in s.elements.values() if (t := element_target(data)))
    return refs


def _set_attrs(table_name: str, name: str, s: FakeSet) -> bytes:
    attrs = {**s.attrs, 1: string(table_name), 2: string(name), 16: _handle(s.handle)}
    if attrs.get(3) == bytes(4):
        del attrs[3]  # no flags: left out
    if s.verdict_map:
        attrs[7] = U32.pack(16)  # the size of a verdict
    if 9 not in attrs:  # no size given: a dynamic set gets 65535 (seen on 6.18), others none
        dynamic = int(U32.unpack(attrs.get(3, bytes(4))[:4])[0]) & SET_EVAL
        attrs[9] = attr(1, U32.pack(0xFFFF)) if dynamic else b""
    attrs[20] = U32.pack(len(s.elements))
    return _ordered(attrs, _SET_ORDER)


ELEMENTS_MESSAGE = 32000  # about what the kernel puts in one message of an element dump


def _element_lists(table_name: str, name: str, s: FakeSet) -> list[bytes]:
    """A set's elements in messages of about 32 KB, then one with none (the kernel's end of
    the dump; for an empty set, only that one). In the order added: the kernel's hash sets
    dump in hash order, which kproxy never relies on."""
    head = attr(1, string(table_name)) + attr(2, string(name))
    out: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for key, data in s.elements.items():
        element = attr(1, attr(1, attr(1, key)) + (attr(2, data) if data else b""))
        if chunk and size + len(element) > ELEMENTS_MESSAGE:
            out.append(head + attr(3, b"".join(chunk)))
            chunk, size = [], 0
        chunk.append(element)
        size += len(element)
    if chunk:
        out.append(head + attr(3, b"".join(chunk)))
    return [*out, head + attr(3, b"")]


def answer_dump(
    tables: Tables, kind: int, family: int, attrs: dict[int, bytes]
) -> list[tuple[int, bytes]]:
    """(family, attributes) of each NEW* message answering a dump; Refused for the elements of
    a missing set (the rules of a missing chain are none)."""
    named = [
        (fam, name, table) for (fam, name), table in sorted(tables.items()) if family in (0, fam)
    ]
    out: list[tuple[int, bytes]] = []
    if kind == GETCHAIN:  # every table of the family, whatever the request names
        for fam, name, table in named:
            refs = _references(table)
            out += [
                (fam, _chain_attrs(name, c, ch, refs[c] + len(ch.rules)))
                for c, ch in table.chains.items()
            ]
        return out
    wanted = text(attrs.get(1, b""))
    tables_named = [(fam, name, t) for fam, name, t in named if not wanted or name == wanted]
    for fam, name, table in tables_named:
        if kind == GETRULE:
            out += [(fam, body) for body in _rules(name, table, attrs)]
        elif kind == GETSET:
            out += [(fam, _set_attrs(name, s_name, s)) for s_name, s in table.sets.items()]
        elif kind == GETSETELEM:
            s_name = text(attrs.get(2, b""))
            out += [(fam, b) for b in _element_lists(name, s_name, find_set(table, s_name))]
    if kind == GETSETELEM and not tables_named:
        raise Refused(errno.ENOENT, f"no table {wanted}")
    return out


def _rules(table_name: str, table: FakeTable, attrs: dict[int, bytes]) -> list[bytes]:
    if 2 in attrs:  # a missing chain answers with nothing, as in the kernel
        found = table.chains.get(text(attrs[2]))
        chains = [(text(attrs[2]), found)] if found is not None else []
    else:
        chains = list(table.chains.items())
    out = []
    for name, chain in chains:
        previous = None
        for handle, exprs, udata in chain.rules:
            rule = {1: string(table_name), 2: string(name), 3: _handle(handle), 4: exprs}
            if previous is not None:
                rule[6] = _handle(previous)  # NFTA_RULE_POSITION: the rule before
            if udata:
                rule[7] = udata
            out.append(_ordered(rule, (1, 2, 3, 6, 4, 7)))
            previous = handle
    return out


def answer_get(
    tables: Tables, generation: int, kind: int, family: int, attrs: dict[int, bytes]
) -> bytes:
    if kind == GETGEN:
        return attr(1, U32.pack(generation))
    if kind == GETTABLE:
        table = tables.get((family, text(attrs.get(1, b""))))
        if table is None:
            raise Refused(errno.ENOENT, "no such table")
        use = len(table.chains) + len(table.sets)
        fixed = {1: attrs[1], 3: U32.pack(use), 4: _handle(table.handle)}
        return _ordered({**table.attrs, **fixed}, _TABLE_ORDER)
    raise Refused(errno.EOPNOTSUPP, f"get {kind}")
