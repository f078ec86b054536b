"""An in-memory nf_tables for unit tests, behind the real NftNetlink: kproxy's own batch framing,
ack handling, dump filtering and encodings run unchanged, and only the socket is fake. It holds
tables, chains, rules, sets and elements as the bytes the messages carried (the kernel's
canonical form is encode.py's business, checked against the kernel elsewhere), applies each batch
as one transaction and answers dumps and gets from what it holds.

Refused, with the kernel's errno (checked against a real kernel: tests/test_nftables_fake.py)
and nothing of the batch applied: deleting a missing table, chain, rule, set or element
(ENOENT); a rule in a missing table or chain, a jump or goto (in a rule or a verdict map's
element) to a missing chain, a lookup of a missing set (ENOENT); a jump or goto to a base chain
(EOPNOTSUPP); deleting a chain that a rule or an element still jumps to, or a set a rule still
looks up (EBUSY); adding an existing table, chain, set or element with NLM_F_EXCL (EEXIST); an
element whose key is not the set's key length, a verdict map's element without a verdict or a
plain set's element with one, an existing element with other data without NLM_F_EXCL
(EINVAL, EEXIST); a loop of jumps reachable from a base chain (EMLINK, as the kernel answers).

Like the kernel, a chain dump answers with the chains of every table of the family, whatever
table it names (kproxy filters); a commit bumps the ruleset generation and notifies monitors
(FakeNftMonitor) of the tables it touched, with the committing socket's port."""

from __future__ import annotations

import copy
import errno
import struct
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy.dataplane.nftables.netlink import (
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES,
    NLM_F_APPEND,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    READ_SIZE,
    Message,
    NftNetlink,
    iter_attrs,
    iter_messages,
    nfgen_message,
)

NEWTABLE, GETTABLE, DELTABLE = 0, 1, 2
NEWCHAIN, GETCHAIN, DELCHAIN = 3, 4, 5
NEWRULE, GETRULE, DELRULE = 6, 7, 8
NEWSET, GETSET, DELSET = 9, 10, 11
NEWSETELEM, GETSETELEM, DELSETELEM = 12, 13, 14
NEWGEN, GETGEN = 15, 16
_JUMP_CODES = (-3, -4)  # NFT_JUMP, NFT_GOTO
_SET_MAP = 0x8
_SET_ID = 10  # NFTA_SET_ID: the transaction's handle of a new set, never dumped
_U32 = struct.Struct(">I")


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
        return int(_U32.unpack(self.attrs[5][:4])[0])

    @property
    def verdict_map(self) -> bool:
        return bool(int(_U32.unpack(self.attrs.get(3, bytes(4))[:4])[0]) & _SET_MAP)


@dataclass
class FakeTable:
    handle: int
    attrs: dict[int, bytes]
    chains: dict[str, FakeChain] = field(default_factory=dict)
    sets: dict[str, FakeSet] = field(default_factory=dict)
    next_handle: int = 1

    def take_handle(self) -> int:
        self.next_handle += 1
        return self.next_handle


Tables = dict[tuple[int, str], FakeTable]  # (nfproto family, name) -> table


def _text(value: bytes) -> str:
    return value.rstrip(b"\0").decode("utf-8", "surrogateescape")


def _string(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape") + b"\0"


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("<HH", length, kind) + data + bytes(-length % 4)


def _verdict(data: bytes) -> tuple[int, str | None]:
    """An NFTA_DATA nest's verdict: code and chain (code 0 and None when it holds none)."""
    inner = dict(iter_attrs(dict(iter_attrs(data)).get(2, b"")))
    code = struct.unpack(">i", inner.get(1, bytes(4))[:4])[0]
    return code, _text(inner[2]) if 2 in inner else None


def _expressions(exprs: bytes) -> Iterator[tuple[str, dict[int, bytes]]]:
    for _kind, element in iter_attrs(exprs):
        attrs = dict(iter_attrs(element))
        yield _text(attrs.get(1, b"")), dict(iter_attrs(attrs.get(2, b"")))


def rule_targets(exprs: bytes) -> tuple[set[str], set[str]]:
    """The chains a rule jumps or goes to, and the sets it looks up or updates."""
    chains: set[str] = set()
    sets: set[str] = set()
    for name, data in _expressions(exprs):
        if name == "immediate" and 2 in data:
            code, chain = _verdict(data[2])
            if code in _JUMP_CODES and chain is not None:
                chains.add(chain)
        elif name in ("lookup", "dynset") and 1 in data:
            sets.add(_text(data[1]))
    return chains, sets


def _element_target(data: bytes) -> str | None:
    code, chain = _verdict(data)
    return chain if code in _JUMP_CODES else None


def chain_edges(table: FakeTable) -> dict[str, set[str]]:
    """Which chains each chain (its rules, and the verdict maps its rules look up) leads to."""
    maps = {
        name: {t for data in s.elements.values() if (t := _element_target(data))}
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


class FakeNfTables:
    """The ruleset of one fake network namespace; sockets (FakeNftNetlink) and monitors
    (FakeNftMonitor) attach to it. `refuse_commit` makes the kernel refuse a later batch."""

    def __init__(self) -> None:
        self.tables: Tables = {}
        self.generation = 1
        self.commits = 0
        self.lock = threading.Lock()
        self._monitors: list[FakeNftMonitor] = []
        self._ports = 100
        self._refusals: dict[int, int] = {}  # batches from now -> errno

    def new_port(self) -> int:
        self._ports += 1
        return self._ports

    def socket(self) -> FakeNftNetlink:
        return FakeNftNetlink(self)

    def monitor(self) -> FakeNftMonitor:
        monitor = FakeNftMonitor()
        self._monitors.append(monitor)
        return monitor

    def refuse_commit(self, code: int = errno.ENOMEM, after: int = 0) -> None:
        """Refuse the batch that comes after `after` more accepted ones."""
        self._refusals[after] = code

    def table(self, family: int, name: str) -> FakeTable | None:
        return self.tables.get((family, name))

    def apply(self, messages: list[Message], port: int) -> tuple[int, int]:
        """Apply a batch's messages as one transaction: (0, 0), or (errno, index of the
        message refused; -1 for the commit)."""
        with self.lock:
            staged = copy.deepcopy(self.tables)
            for index, msg in enumerate(messages):
                try:
                    _execute(staged, msg)
                except Refused as exc:
                    return exc.code, index
            refusal = self._refusals.pop(0, None)
            self._refusals = {k - 1: v for k, v in self._refusals.items()}
            if refusal is not None:
                return refusal, -1
            touched = {(m.family, _text(dict(iter_attrs(m.attrs)).get(1, b""))) for m in messages}
            for key in touched:
                if key in staged and _has_loop(staged[key]):
                    return errno.EMLINK, -1  # the kernel's answer to a loop (its jump stack)
            self.tables = staged
            self.generation += 1
            self.commits += 1
            for monitor in self._monitors:
                monitor.heard.extend((port, family, name) for family, name in touched)
            return 0, 0


def _has_loop(table: FakeTable) -> bool:
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
    table = tables.get((msg.family, _text(attrs.get(1, b""))))
    if table is None:
        raise Refused(errno.ENOENT, f"no table {_text(attrs.get(1, b''))}")
    return table


def _find_chain(table: FakeTable, name: str) -> FakeChain:
    chain = table.chains.get(name)
    if chain is None:
        raise Refused(errno.ENOENT, f"no chain {name}")
    return chain


def _find_set(table: FakeTable, name: str) -> FakeSet:
    found = table.sets.get(name)
    if found is None:
        raise Refused(errno.ENOENT, f"no set {name}")
    return found


def _check_jump(table: FakeTable, target: str) -> None:
    if _find_chain(table, target).base:
        raise Refused(errno.EOPNOTSUPP, f"a jump to base chain {target}")


def _execute(tables: Tables, msg: Message) -> None:
    kind = msg.type & 0xFF
    if msg.type >> 8 != NFNL_SUBSYS_NFTABLES or kind not in _HANDLERS:
        raise Refused(errno.EOPNOTSUPP, f"message type {msg.type:#x}")
    _HANDLERS[kind](tables, msg, dict(iter_attrs(msg.attrs)))


def _new_table(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    key = (msg.family, _text(attrs[1]))
    if key in tables:
        if msg.flags & NLM_F_EXCL:
            raise Refused(errno.EEXIST, f"table {key[1]} exists")
        return
    tables[key] = FakeTable(len(tables) + 1, {k: v for k, v in attrs.items() if k != 1})


def _del_table(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    _find_table(tables, msg, attrs)
    del tables[(msg.family, _text(attrs[1]))]


def _new_chain(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    name = _text(attrs[3])
    if name in table.chains:
        if msg.flags & NLM_F_EXCL:
            raise Refused(errno.EEXIST, f"chain {name} exists")
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
        if any(_element_target(data) == name for data in s.elements.values())
    ]
    return users


def _del_chain(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    name = _text(attrs.get(3, b""))
    _find_chain(table, name)
    users = _users_of_chain(table, name)
    if users:
        raise Refused(errno.EBUSY, f"chain {name} is used by {users[0]}")
    del table.chains[name]  # its own rules go with it, as in the kernel


def _new_rule(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    chain = _find_chain(table, _text(attrs.get(2, b"")))
    exprs = attrs.get(4, b"")
    targets, sets = rule_targets(exprs)
    for target in sorted(targets):
        _check_jump(table, target)
    for set_name in sorted(sets):
        _find_set(table, set_name)
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
    chain = _find_chain(table, _text(attrs[2]))
    if 3 not in attrs:
        chain.rules.clear()
        return
    handle = int.from_bytes(attrs[3][:8], "big")
    kept = [r for r in chain.rules if r[0] != handle]
    if len(kept) == len(chain.rules):
        raise Refused(errno.ENOENT, f"no rule {handle} in chain {_text(attrs[2])}")
    chain.rules = kept


def _new_set(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    name = _text(attrs[2])
    if name in table.sets:
        if msg.flags & NLM_F_EXCL:
            raise Refused(errno.EEXIST, f"set {name} exists")
        return
    kept = {k: v for k, v in attrs.items() if k not in (1, 2, _SET_ID)}
    table.sets[name] = FakeSet(table.take_handle(), kept)


def _del_set(tables: Tables, msg: Message, attrs: dict[int, bytes]) -> None:
    table = _find_table(tables, msg, attrs)
    name = _text(attrs.get(2, b""))
    _find_set(table, name)
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
    named = _find_set(table, _text(attrs.get(2, b"")))
    for key, data in _elements(attrs):
        if len(key) != named.key_len:
            raise Refused(errno.EINVAL, f"a key of {len(key)} bytes, the set's are {named.key_len}")
        if (data is None) == named.verdict_map:
            raise Refused(errno.EINVAL, "an element's data does not fit the set")
        target = _element_target(data) if data is not None else None
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
    named = _find_set(table, _text(attrs.get(2, b"")))
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


# --- answering dumps and gets, in the kernel's attribute order -----------------------------


def _handle(value: int) -> bytes:
    return struct.pack(">Q", value)


def _sorted_attrs(head: bytes, attrs: dict[int, bytes]) -> bytes:
    return head + b"".join(_attr(k, attrs[k]) for k in sorted(attrs))


def _dump(
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
            for chain_name, chain in table.chains.items():
                head = _attr(1, _string(name)) + _attr(2, _handle(chain.handle))
                out.append((fam, _sorted_attrs(head + _attr(3, _string(chain_name)), chain.attrs)))
        return out
    wanted = _text(attrs.get(1, b""))
    tables_named = [(fam, name, t) for fam, name, t in named if not wanted or name == wanted]
    for fam, name, table in tables_named:
        head = _attr(1, _string(name))
        if kind == GETRULE:
            out += _dump_rules(fam, head, table, attrs)
        elif kind == GETSET:
            for set_name, s in table.sets.items():
                attrs_out = {**s.attrs, 16: _handle(s.handle)}
                out.append((fam, _sorted_attrs(head + _attr(2, _string(set_name)), attrs_out)))
        elif kind == GETSETELEM:
            named_set = _find_set(table, _text(attrs.get(2, b"")))
            elements = b"".join(
                _attr(1, _attr(1, _attr(1, key)) + (_attr(2, data) if data else b""))
                for key, data in named_set.elements.items()
            )
            out.append((fam, head + _attr(2, attrs.get(2, b"")) + _attr(3, elements)))
    if kind == GETSETELEM and not tables_named:
        raise Refused(errno.ENOENT, f"no table {wanted}")
    return out


def _dump_rules(
    family: int, head: bytes, table: FakeTable, attrs: dict[int, bytes]
) -> list[tuple[int, bytes]]:
    if 2 in attrs:  # a missing chain answers with nothing, as in the kernel
        found = table.chains.get(_text(attrs[2]))
        chains = [(_text(attrs[2]), found)] if found is not None else []
    else:
        chains = list(table.chains.items())
    out = []
    for name, chain in chains:
        for handle, exprs, udata in chain.rules:
            body = _attr(2, _string(name)) + _attr(3, _handle(handle)) + _attr(4, exprs)
            out.append((family, head + body + (_attr(7, udata) if udata else b"")))
    return out


def _get(nft: FakeNfTables, kind: int, family: int, attrs: dict[int, bytes]) -> bytes:
    if kind == GETGEN:
        return _attr(1, _U32.pack(nft.generation))
    if kind == GETTABLE:
        table = nft.table(family, _text(attrs.get(1, b"")))
        if table is None:
            raise Refused(errno.ENOENT, "no such table")
        use = len(table.chains) + len(table.sets)
        fixed = {3: _U32.pack(use), 4: _handle(table.handle)}
        return _sorted_attrs(_attr(1, attrs[1]), {**table.attrs, **fixed})
    raise Refused(errno.EOPNOTSUPP, f"get {kind}")


# --- the socket ----------------------------------------------------------------------------


def _error(seq: int, code: int) -> bytes:
    """An NLMSG_ERROR (with NETLINK_CAP_ACK: the request's header only)."""
    return struct.pack("<IHHII", 36, NLMSG_ERROR, 0, seq, 0) + struct.pack("<i", -code) + bytes(16)


def _done(seq: int) -> bytes:
    return struct.pack("<IHHII", 20, NLMSG_DONE, NLM_F_MULTI, seq, 0) + bytes(4)


class FakeSocket:
    """What NftNetlink asks of its socket: a send is answered by datagrams to read."""

    def __init__(self, nft: FakeNfTables) -> None:
        self.nft = nft
        self.port = nft.new_port()
        self.replies: deque[bytes] = deque()

    def setsockopt(self, *args: object) -> None:
        pass

    def getsockname(self) -> tuple[int, int]:
        return self.port, 0

    def close(self) -> None:
        pass

    def recv_into(self, buffer: bytearray) -> int:
        if not self.replies:
            raise BlockingIOError(errno.EAGAIN, "nothing to read")  # a real one would hang
        data = self.replies.popleft()
        buffer[: len(data)] = data
        return len(data)

    def send(self, data: bytes) -> int:
        messages = list(iter_messages(bytes(data)))
        if messages and messages[0].type == NFNL_MSG_BATCH_BEGIN:
            self._batch(messages)
        else:
            for msg in messages:
                self._request(msg)
        return len(data)

    def _batch(self, messages: list[Message]) -> None:
        begin = messages[0].seq
        body = [m for m in messages[1:] if m.type != NFNL_MSG_BATCH_END]
        code, index = self.nft.apply(body, self.port)
        if code and index < 0:
            self.replies.append(_error(begin, code))
            return
        if code:
            self.replies.append(_error(body[index].seq, code))
        acked = [m for m in body if m.flags & 0x4 and not (code and m is body[index])]
        self.replies.extend(_error(m.seq, 0) for m in acked)

    def _request(self, msg: Message) -> None:
        kind, attrs = msg.type & 0xFF, dict(iter_attrs(msg.attrs))
        subsys = NFNL_SUBSYS_NFTABLES << 8
        try:
            with self.nft.lock:
                if msg.flags & NLM_F_DUMP == NLM_F_DUMP:
                    answers = _dump(self.nft.tables, kind, msg.family, attrs)
                    reply = b"".join(
                        nfgen_message(subsys | (kind - 1), NLM_F_MULTI, msg.seq, fam, body)
                        for fam, body in answers
                    )
                    self.replies.append(reply + _done(msg.seq))
                else:
                    body = _get(self.nft, kind, msg.family, attrs)
                    self.replies.append(
                        nfgen_message(subsys | (kind - 1), 0, msg.seq, msg.family, body)
                    )
        except Refused as exc:
            self.replies.append(_error(msg.seq, exc.code))


class FakeNftNetlink(NftNetlink):
    """NftNetlink on a FakeSocket attached to `nft` (each one a program of its own: its own
    port, which the notifications of its commits carry)."""

    def __init__(self, nft: FakeNfTables) -> None:
        self.sock = FakeSocket(nft)  # type: ignore[assignment]
        self._seq = 1
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self.last_commit_seconds = 0.0
        self.kernel_seconds = 0.0


class FakeNftMonitor:
    """NftMonitor's surface, told of every commit to the FakeNfTables it came from."""

    def __init__(self) -> None:
        self.heard: list[tuple[int, int, str]] = []  # port, family, table
        self.lost = False

    def close(self) -> None:
        pass

    def changed_tables(self, own_port: int) -> set[tuple[int, str]] | None:
        heard, self.heard = self.heard, []
        lost, self.lost = self.lost, False
        if lost:
            return None
        return {(family, table) for port, family, table in heard if port != own_port}
