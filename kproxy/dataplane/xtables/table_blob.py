"""One x_tables table as the kernel holds it, edited and compiled again into the blob the kernel
replaces it with: what libiptc does for iptables-legacy, done for kproxy's changes only.

`parse_table` cuts the kernel's image (IPT_SO_GET_ENTRIES) into chains, in the kernel's order: a
built-in chain runs from its hook entry to its policy entry (the underflow), a user chain from
an ERROR entry naming it to a RETURN entry, and the table ends with an ERROR entry "ERROR". Other
programs' entries stay bytes of the image: only their standard targets are read, because a jump
(a verdict >= 0) is a byte offset that moves when anything before its target moves. Each one
becomes the name of the chain it jumps to, or "the next entry" (a rule without a verdict).

`TableEdit.apply` carries out a TableChanges as libiptc's calls did (remove jumps, create,
flush and append, flush and delete, insert jumps), and `compile` lays the chains out again the
way libiptc does (built-in chains in the image's order, user chains by name) and turns names
back into offsets. Every carried entry remembers its index in the image, so that its packet
counters can be given back after the replace (see kernel_write.py).
"""

from __future__ import annotations

import bisect
import mmap
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from kproxy.dataplane.xtables.diff import TableChanges
from kproxy.dataplane.xtables.kernel_image import NF_INET_NUMHOOKS, TableImage
from kproxy.errors import DataplaneError
from kproxy.rules.ir import Rule

ENTRY_TARGET_SIZE = 32  # struct xt_entry_target: u16 size, char name[29], u8 revision
STANDARD_TARGET_SIZE = 40  # XT_ALIGN(sizeof(struct xt_standard_target))
ERROR_TARGET_SIZE = 64  # XT_ALIGN(sizeof(struct xt_error_target))
FUNCTION_NAME_SIZE = 30  # xt_error_target.errorname
MAX_CHAIN_NAME = 28  # what libiptc accepts (XT_EXTENSION_MAXNAMELEN - 1)
REPLACE_HEADER = 96  # sizeof(struct ipt_replace) == sizeof(struct ip6t_replace)
# Verdicts of the standard target (negative: -NF_<verdict> - 1).
VERDICTS = {b"DROP": -1, b"ACCEPT": -2, b"QUEUE": -4, b"RETURN": -5}
XT_RETURN = VERDICTS[b"RETURN"]
_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")
_NO_NAME = bytes(ENTRY_TARGET_SIZE - 2)  # a standard target's name and revision
HOOK_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")  # NF_INET_* order


@dataclass(frozen=True, slots=True)
class EntryLayout:
    """Where ipt_entry (IPv4) or ip6t_entry (IPv6) keeps its offsets, from the kernel headers."""

    size: int
    target_offset_at: int

    def empty_entry(self, target: bytes) -> bytes:
        """An entry that matches every packet, with `target`, as libiptc makes chain heads/feet."""
        header = bytearray(self.size)
        struct.pack_into("=HH", header, self.target_offset_at, self.size, self.size + len(target))
        return bytes(header) + target


LAYOUTS = {4: EntryLayout(size=112, target_offset_at=88), 6: EntryLayout(168, 140)}


def _standard_target(verdict: int) -> bytes:
    return struct.pack("=H30x i4x", STANDARD_TARGET_SIZE, verdict)


def _error_target(name: bytes) -> bytes:
    return struct.pack("=H29sx30s2x", ERROR_TARGET_SIZE, b"ERROR", name)


@dataclass(slots=True)
class Run:
    """Consecutive entries of the image: bytes [start, end), `count` entries from `index` on."""

    start: int
    end: int
    index: int
    count: int


Piece = Run | Rule  # a Rule is one of kproxy's, encoded when the table is compiled


@dataclass(slots=True)
class _Chain:
    name: str
    hook: int | None  # built-in chains: the hook they start at
    head: Run | None  # user chains: the ERROR entry naming the chain (None: make one)
    pieces: list[Piece] = field(default_factory=list)
    foot: Run | None = None  # the policy entry, or a user chain's RETURN (None: make one)


def _refuse(table: str, why: str) -> DataplaneError:
    return DataplaneError(f"table {table}: {why}; kproxy does not write a table it cannot read")


class TableEdit:
    """A table parsed from an image, then edited; `compile` makes the blob to replace it with."""

    def __init__(self, image: TableImage) -> None:
        self.image = image
        self.layout = LAYOUTS[image.family]
        self.chains: dict[str, _Chain] = {}
        self.end: Run = Run(0, 0, 0, 0)
        # Every standard target of the image with a verdict >= 0: where its verdict is, and the
        # chain it jumps to (None: the next entry).
        self.jump_at = array("I")
        self.jump_to: list[str | None] = []
        self.deleted: set[str] = set()  # chains `apply` deleted (for the error a jump to one gets)
        self._parse()

    # -- parsing ---------------------------------------------------------------------------------

    def _parse(self) -> None:
        image, layout, name = self.image, self.layout, self.image.name
        entries = image.entries
        valid, *points = struct.unpack_from(f"={2 * NF_INET_NUMHOOKS + 1}I", image.hooks)
        hooks = [h for h in range(NF_INET_NUMHOOKS) if valid & (1 << h)]
        starts = {points[h]: h for h in hooks}
        underflow = {h: points[NF_INET_NUMHOOKS + h] for h in hooks}
        chain: _Chain | None = None
        first_rule = 0  # where the current chain's rules start
        previous: tuple[int, int, bool] = (0, 0, False)  # offset, index, whether a plain RETURN
        heads: dict[int, str] = {}  # a user chain's first rule -> its name
        forward: list[tuple[int, int]] = []  # (jump number, verdict) resolved once heads are known
        offset = index = 0
        size = len(entries)
        unpack_offsets = struct.Struct("=HH").unpack_from
        unpack_verdict = struct.Struct("=i").unpack_from
        while offset < size:
            if offset + layout.size > size:
                raise _refuse(name, f"entry at {offset} is cut short")
            target_offset, next_offset = unpack_offsets(entries, offset + layout.target_offset_at)
            target = offset + target_offset
            if target_offset < layout.size or target_offset + ENTRY_TARGET_SIZE > next_offset:
                raise _refuse(name, f"entry at {offset} has a malformed target")
            if offset + next_offset > size:
                raise _refuse(name, f"entry at {offset} runs past the table's end")
            is_error = is_return = False
            if entries[target + 2] == 0:  # the standard target (its name is empty)
                if next_offset - target_offset < STANDARD_TARGET_SIZE:
                    raise _refuse(name, f"standard target at {offset} is too small")
                (verdict,) = unpack_verdict(entries, target + ENTRY_TARGET_SIZE)
                if verdict >= 0:
                    self.jump_at.append(target + ENTRY_TARGET_SIZE)
                    if verdict == offset + next_offset:
                        self.jump_to.append(None)
                    else:
                        forward.append((len(self.jump_to), verdict))
                        self.jump_to.append("")
                is_return = verdict == XT_RETURN and target_offset == layout.size
            else:
                is_error = bytes(entries[target + 2 : target + 8]) == b"ERROR\0"
            if chain is not None and chain.hook is None and (is_error or offset in starts):
                # A user chain ends at the entry before the next chain: its RETURN.
                prev_offset, prev_index, prev_return = previous
                if not prev_return or prev_offset < first_rule:
                    raise _refuse(name, f"user chain {chain.name} does not end with RETURN")
                assert chain.head is not None
                count = prev_index - chain.head.index - 1
                chain.pieces = [Run(first_rule, prev_offset, chain.head.index + 1, count)]
                if not count:
                    chain.pieces = []
                chain.foot = Run(prev_offset, offset, prev_index, 1)
                chain = None
            if chain is None:
                if offset in starts:
                    hook = starts[offset]
                    chain = _Chain(HOOK_CHAINS[hook], hook, None)
                    self._add(chain)
                    first_rule = offset
                elif is_error:
                    label = _c_string(entries[target + ENTRY_TARGET_SIZE : target + next_offset])
                    if label == "ERROR" and offset + next_offset == size:
                        self.end = Run(offset, size, index, 1)
                        index += 1
                        break
                    chain = _Chain(label, None, Run(offset, offset + next_offset, index, 1))
                    self._add(chain)
                    first_rule = offset + next_offset
                    heads[first_rule] = label
                    previous = (offset, index, False)
                    offset += next_offset
                    index += 1
                    continue
                else:
                    raise _refuse(name, f"entry at {offset} belongs to no chain")
            if chain.hook is not None:
                if offset == underflow[chain.hook]:
                    chain.foot = Run(offset, offset + next_offset, index, 1)
                    chain = None
                elif is_error or (offset in starts and offset != first_rule):
                    raise _refuse(name, f"built-in chain {chain.name} has no policy entry")
                else:
                    chain.pieces.append(Run(offset, offset + next_offset, index, 1))
            previous = (offset, index, is_return)
            offset += next_offset
            index += 1
        if self.end.end != size or index != image.num_entries:
            raise _refuse(name, "the table does not end with its ERROR entry")
        for number, verdict in forward:
            target_chain = heads.get(verdict)
            if target_chain is None:
                raise _refuse(
                    name,
                    f"a rule jumps to offset {verdict}, neither the next rule nor a user chain",
                )
            self.jump_to[number] = target_chain

    def _add(self, chain: _Chain) -> None:
        if chain.name in self.chains:
            raise _refuse(self.image.name, f"chain {chain.name} appears twice")
        self.chains[chain.name] = chain

    # -- editing ---------------------------------------------------------------------------------

    def apply(self, changes: TableChanges) -> None:
        """Carry out `changes` in the order and with the refusals of libiptc's calls."""
        for name, positions in changes.remove_jumps.items():
            chain = self._chain(name)
            self._split(chain)
            for pos in sorted(positions, reverse=True):
                if pos >= len(chain.pieces):
                    raise self._error(f"can't delete rule {pos} of {name}: no such rule")
                del chain.pieces[pos]
        for name in sorted(changes.create):
            if name in self.chains:
                raise self._error(f"can't create chain {name}: it exists")
            if len(name.encode()) > MAX_CHAIN_NAME or name.encode() in VERDICTS or not name:
                raise self._error(f"can't create chain {name}: invalid name")
            self.chains[name] = _Chain(name, None, None)
        created = set(changes.create)
        for wanted in changes.write:
            chain = self._chain(wanted.name)
            if wanted.name not in created:
                chain.pieces = []
            chain.pieces.extend(wanted.rules)
        for name in changes.delete:
            self._chain(name).pieces = []
        self.deleted = set(changes.delete)
        for name in changes.delete:
            if self._chain(name).hook is not None:
                raise self._error(f"can't delete built-in chain {name}")
            del self.chains[name]
        for jump in changes.insert_jumps:
            chain = self._chain(jump.chain)
            if jump.append:
                chain.pieces.append(jump.rule)
            else:
                chain.pieces.insert(0, jump.rule)

    def _chain(self, name: str) -> _Chain:
        chain = self.chains.get(name)
        if chain is None:
            raise self._error(f"no chain {name}")
        return chain

    def _error(self, why: str) -> DataplaneError:
        return DataplaneError(f"writing table {self.image.name} failed: {why}")

    def _split(self, chain: _Chain) -> None:
        """One piece per rule, so that positions count rules."""
        pieces: list[Piece] = []
        for piece in chain.pieces:
            if isinstance(piece, Run) and piece.count > 1:
                pieces.extend(self._entries(piece))
            else:
                pieces.append(piece)
        chain.pieces = pieces

    def _entries(self, run: Run) -> list[Run]:
        out, offset, index = [], run.start, run.index
        at = self.layout.target_offset_at + 2
        while offset < run.end:
            (step,) = struct.unpack_from("=H", self.image.entries, offset + at)
            out.append(Run(offset, offset + step, index, 1))
            offset, index = offset + step, index + 1
        return out

    # -- compiling -------------------------------------------------------------------------------

    def compile(self, encode: Callable[[Rule], bytes]) -> Compiled:
        """The blob for IPT_SO_SET_REPLACE (its header left for the caller), built-in chains in
        the image's order, then user chains by name, as libiptc lays them out."""
        chains = [c for c in self.chains.values() if c.hook is not None]
        chains += sorted(
            (c for c in self.chains.values() if c.hook is None), key=lambda c: c.name.encode()
        )
        # Room for the image and every new rule at up to 1 KiB (kproxy's are under half that):
        # only what is written of it is ever in memory.
        new = sum(1 for c in chains for p in c.pieces if not isinstance(p, Run))
        capacity = REPLACE_HEADER + len(self.image.entries) + (new + 2 * len(chains)) * 1024
        out = _Output(self, encode, capacity)
        try:
            for chain in chains:
                out.chain(chain)
            out.run(self.end)
            out.resolve()
        except BaseException:
            out.compiled.close()
            raise
        return out.compiled


@dataclass
class Compiled:
    """What `TableEdit.compile` made: the blob (`size` bytes of `blob`, REPLACE_HEADER of them
    left free at its start), where the built-in chains begin and end, and which old counters go
    to which new entries.

    The blob is an anonymous mapping, not a bytearray: its pages cost memory only once written,
    so it is mapped larger than it will probably be, grows without copying (mremap) if it must,
    and goes back to the kernel whole once closed (a bytearray grown entry by entry was copied
    as it grew, and left the heap it grew in fragmented: about 50 MB at 10,000 services)."""

    blob: mmap.mmap
    size: int
    num_entries: int
    hook_entry: list[int]
    underflow: list[int]
    carried: list[tuple[int, int, int]]  # (new index, old index, count)

    def close(self) -> None:
        self.blob.close()


def _mapping(size: int) -> mmap.mmap:
    size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class _Output:
    def __init__(self, edit: TableEdit, encode: Callable[[Rule], bytes], capacity: int) -> None:
        self.edit = edit
        self.encode = encode
        self.layout = edit.layout
        self.compiled = Compiled(
            _mapping(capacity),
            REPLACE_HEADER,
            0,
            [0] * NF_INET_NUMHOOKS,
            [0] * NF_INET_NUMHOOKS,
            [],
        )
        self.starts: dict[str, int] = {}  # user chain -> offset of its first rule
        # Jumps whose chain may come later: where the verdict goes, and the chain (two arrays,
        # not a list of pairs: there are about two for every service's endpoint).
        self.pending_at = array("Q")
        self.pending_to: list[str] = []
        self.builtin = {n.encode() for n, c in edit.chains.items() if c.hook is not None}

    @property
    def offset(self) -> int:
        return self.compiled.size - REPLACE_HEADER

    def _append(self, data: bytes | memoryview) -> int:
        """Write `data` at the end of the blob; where it starts."""
        compiled = self.compiled
        base, end = compiled.size, compiled.size + len(data)
        if end > len(compiled.blob):
            compiled.blob.resize(-(-2 * end // mmap.PAGESIZE) * mmap.PAGESIZE)
        compiled.blob[base:end] = data
        compiled.size = end
        return base

    def chain(self, chain: _Chain) -> None:
        if chain.hook is not None:
            self.compiled.hook_entry[chain.hook] = self.offset
        else:
            if chain.head is not None:
                self.run(chain.head)
            else:
                self.new(self.layout.empty_entry(_error_target(chain.name.encode())))
            self.starts[chain.name] = self.offset
        for piece in chain.pieces:
            if isinstance(piece, Run):
                self.run(piece)
            else:
                self.rule(piece)
        if chain.hook is not None:
            self.compiled.underflow[chain.hook] = self.offset
        if chain.foot is not None:
            self.run(chain.foot)
        else:
            self.new(self.layout.empty_entry(_standard_target(XT_RETURN)))

    def run(self, run: Run) -> None:
        compiled, edit = self.compiled, self.edit
        base = self._append(edit.image.entries[run.start : run.end])
        compiled.carried.append((compiled.num_entries, run.index, run.count))
        compiled.num_entries += run.count
        jump_at = edit.jump_at
        first = bisect.bisect_left(jump_at, run.start)
        last = bisect.bisect_left(jump_at, run.end, first)
        delta = base - REPLACE_HEADER - run.start
        blob = compiled.blob
        for number in range(first, last):
            at = base + jump_at[number] - run.start
            target = edit.jump_to[number]
            if target is None:  # falls through: to the next entry, wherever it now is
                (verdict,) = _I32.unpack_from(blob, at)
                _I32.pack_into(blob, at, verdict + delta)
            else:
                self.pending_at.append(at)
                self.pending_to.append(target)

    def new(self, entry: bytes) -> None:
        self._append(entry)
        self.compiled.num_entries += 1

    def rule(self, rule: Rule) -> None:
        """One of kproxy's rules, its target named as libiptc expects on append."""
        entry = self.encode(rule)
        base = self._append(entry)
        blob = self.compiled.blob
        self.compiled.num_entries += 1
        (target_offset,) = _U16.unpack_from(entry, self.layout.target_offset_at)
        name_at = target_offset + 2
        label = entry[name_at : name_at + ENTRY_TARGET_SIZE - 3]
        end = label.find(0)
        if end >= 0:
            label = label[:end]
        verdict_at = base + target_offset + ENTRY_TARGET_SIZE
        chain = None
        if not label:  # no verdict: on to the next entry
            verdict = base - REPLACE_HEADER + len(entry)
        elif label in VERDICTS:
            verdict = VERDICTS[label]
        else:
            if label in self.builtin:
                raise self.edit._error(f"a rule jumps to built-in chain {label.decode()}")
            jumped = self.edit.chains.get(label.decode(errors="replace"))
            if jumped is None:
                if rule.target is not None and rule.target.is_jump:
                    raise self._missing(rule.target.name)
                return  # a target extension's, as python-iptables built it
            chain, verdict = jumped.name, 0  # the chain's own name: one string for every jump
        if len(entry) - target_offset != STANDARD_TARGET_SIZE:
            raise self.edit._error(f"target {label.decode()} is not a standard target")
        blob[base + name_at : verdict_at] = _NO_NAME  # and revision 0
        if chain is None:
            _I32.pack_into(blob, verdict_at, verdict)
        else:
            self.pending_at.append(verdict_at)
            self.pending_to.append(chain)

    def _missing(self, chain: str) -> DataplaneError:
        if chain in self.edit.deleted:
            return self.edit._error(f"can't delete chain {chain}: a rule still jumps to it")
        return self.edit._error(f"a rule jumps to chain {chain}, which does not exist")

    def resolve(self) -> None:
        blob = self.compiled.blob
        starts, pack = self.starts, _I32.pack_into
        for at, chain in zip(self.pending_at, self.pending_to, strict=True):
            start = starts.get(chain)
            if start is None:
                raise self._missing(chain)
            pack(blob, at, start)


def _c_string(raw: bytes | memoryview) -> str:
    data = bytes(raw)
    return data[: data.find(b"\0")].decode(errors="replace") if b"\0" in data else data.decode()
