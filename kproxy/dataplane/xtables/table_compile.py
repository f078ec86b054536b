"""The blob a table is replaced with, laid out from a TableEdit (table_blob.py): each chain's
entries written one after the other as libiptc lays them out, kproxy's rules encoded straight into
an anonymous mapping, every run of the image's entries copied as it is with its fall-throughs
moved, and every jump's verdict set, once all chains have their places, to the offset of its
chain's first rule. It records which old counters go to which new entries (kernel_write.py gives
them back) and the index of what it wrote (table_index.py)."""

from __future__ import annotations

import bisect
import mmap
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING

from kproxy.dataplane.xtables.entries import MAX_ENTRY
from kproxy.dataplane.xtables.kernel_image import NF_INET_NUMHOOKS
from kproxy.dataplane.xtables.table_index import (
    BOUNDS,
    END,
    END_INDEX,
    ENTRY_TARGET_SIZE,
    FIRST,
    FOOT,
    HEAD,
    HEAD_INDEX,
    STANDARD_TARGET_SIZE,
    XT_RETURN,
    BuiltinChain,
    EntryLayout,
    Run,
    TableIndex,
)
from kproxy.errors import DataplaneError
from kproxy.rules.ir import Rule

if TYPE_CHECKING:
    from kproxy.dataplane.xtables.table_blob import TableEdit

ERROR_TARGET_SIZE = 64  # XT_ALIGN(sizeof(struct xt_error_target))
REPLACE_HEADER = 96  # sizeof(struct ipt_replace) == sizeof(struct ip6t_replace)
# Verdicts of the standard target (negative: -NF_<verdict> - 1).
VERDICTS = {b"DROP": -1, b"ACCEPT": -2, b"QUEUE": -4, b"RETURN": XT_RETURN}
VERDICT_NAMES = {name.decode(): verdict for name, verdict in VERDICTS.items()}
GONE = -1  # BlobOutput.moved: a chain deleted
U16 = struct.Struct("=H")
I32 = struct.Struct("=i")
_NO_NAME = bytes(ENTRY_TARGET_SIZE - 2)  # a standard target's name and revision


def _empty_entry(layout: EntryLayout, target_size: int) -> bytes:
    """The entry, without its target, of a chain's head or foot as libiptc makes them: it
    matches every packet."""
    header = bytearray(layout.size)
    U16.pack_into(header, layout.target_offset_at, layout.size)
    U16.pack_into(header, layout.target_offset_at + 2, layout.size + target_size)
    return bytes(header)


def _standard_target(verdict: int) -> bytes:
    return struct.pack("=H30x i4x", STANDARD_TARGET_SIZE, verdict)


def _error_target(name: bytes) -> bytes:
    return struct.pack("=H29sx30s2x", ERROR_TARGET_SIZE, b"ERROR", name)


Piece = Run | Rule  # a Rule is one of kproxy's, encoded when the table is compiled
# Writes a rule's entry at an offset of a buffer: (its size, its target's offset, its target's
# name), as EntryCompiler.write_entry does.
WriteEntry = Callable[[Rule, mmap.mmap, int], tuple[int, int, str]]


@dataclass(slots=True)
class EditedChain:
    """A chain being edited: built-in (`hook`), or a user chain taken out of the index."""

    name: str
    hook: int | None
    head: Run | None  # a user chain's ERROR entry (None: make one)
    pieces: list[Piece]
    foot: Run | None  # the policy entry, or a user chain's RETURN (None: make one)


@dataclass
class Compiled:
    """What `TableEdit.compile` made: the blob (`size` bytes of `blob`, REPLACE_HEADER of them
    left free at its start), where the built-in chains begin and end, which old counters go to
    which new entries, and the blob's index.

    The blob is an anonymous mapping, not a bytearray: its pages cost memory only once written,
    so it is mapped larger than it will probably be, grows without copying (mremap) if it must,
    and goes back to the kernel whole once closed (a bytearray grown entry by entry was copied
    as it grew, and left the heap it grew in fragmented)."""

    blob: mmap.mmap
    size: int
    num_entries: int
    hook_entry: list[int]
    underflow: list[int]
    carried: list[tuple[int, int, int]]  # (new index, old index, count)
    index: TableIndex

    def close(self) -> None:
        self.blob.close()


def _mapping(size: int) -> mmap.mmap:
    size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class BlobOutput:
    def __init__(self, edit: TableEdit, write_entry: WriteEntry, capacity: int) -> None:
        self.edit = edit
        self.write_entry = write_entry
        self.layout = edit.layout
        self.target_offset_at = edit.layout.target_offset_at
        self.compiled = Compiled(
            _mapping(capacity),
            REPLACE_HEADER,
            0,
            [0] * NF_INET_NUMHOOKS,
            [0] * NF_INET_NUMHOOKS,
            [],
            TableIndex(),
        )
        self.head_entry = _empty_entry(self.layout, ERROR_TARGET_SIZE)
        self.foot_entry = _empty_entry(self.layout, STANDARD_TARGET_SIZE) + _standard_target(
            XT_RETURN
        )
        self.names: dict[str, str] = {}  # one string per chain jumped to, however many jumps
        # The image's user chains whose first rule is no longer where it was, with where it is
        # now (GONE: deleted). A jump copied from the image to any other chain is still right.
        self.moved: dict[str, int] = {}
        self.fresh: list[int] = []  # where in the index's jumps kproxy's new rules' jumps are
        # The image's chain numbers, as a start: a block of chains that keeps its numbers (all
        # before the first chain created or deleted) needs no entry of its own; deleted chains
        # leave in resolve().
        self.compiled.index.positions = dict(edit.index.positions)

    @property
    def offset(self) -> int:
        return self.compiled.size - REPLACE_HEADER

    def _append(self, data: bytes | memoryview) -> int:
        """Write `data` at the end of the blob; where it starts in the entries."""
        compiled = self.compiled
        base, end = compiled.size, compiled.size + len(data)
        if end > len(compiled.blob):
            compiled.blob.resize(-(-2 * end // mmap.PAGESIZE) * mmap.PAGESIZE)
        compiled.blob[base:end] = data
        compiled.size = end
        return base - REPLACE_HEADER

    def kept_block(self, first: int, last: int) -> None:
        """User chains `first` to `last` - 1 of the index, unedited and adjacent in the image:
        copied in one run, their places in the index moved in bulk."""
        index, out = self.edit.index, self.compiled.index
        bounds = index.bounds[first * BOUNDS : last * BOUNDS]
        moved = self.offset - bounds[HEAD]
        renumbered = self.compiled.num_entries - bounds[HEAD_INDEX]
        # Chains before the first edit, and after edits that kept the sizes, stay where they were.
        if moved:
            for column in (HEAD, FIRST, FOOT, END):
                bounds[column::BOUNDS] = array("I", [at + moved for at in bounds[column::BOUNDS]])
        if renumbered:
            for column in (HEAD_INDEX, END_INDEX):
                bounds[column::BOUNDS] = array(
                    "I", [n + renumbered for n in bounds[column::BOUNDS]]
                )
        names = index.names[first:last]
        if moved:
            self.moved.update(zip(names, bounds[FIRST::BOUNDS], strict=True))
        if len(out.names) != first:
            numbers = range(len(out.names), len(out.names) + len(names))
            out.positions.update(zip(names, numbers, strict=True))
        out.names += names
        start = index.bound(first, HEAD)
        head_index = index.bound(first, HEAD_INDEX)
        count = index.bound(last - 1, END_INDEX) - head_index
        self.run(Run(start, index.bound(last - 1, END), head_index, count))
        out.bounds += bounds

    def chain(self, chain: EditedChain) -> None:
        out = self.compiled
        head = self.offset
        head_index = out.num_entries
        if chain.hook is not None:
            out.hook_entry[chain.hook] = head
        elif chain.head is not None:
            self.run(chain.head)
        else:
            self.new(self.head_entry + _error_target(chain.name.encode()))
        first = self.offset
        rules = []
        if chain.hook is None:
            batch: list[Rule] = []
            for piece in chain.pieces:
                if isinstance(piece, Run):
                    self.rules(batch)
                    batch = []
                    self.run(piece)
                else:
                    batch.append(piece)
            self.rules(batch)
        else:  # a built-in chain's rules are counted by position: each one's place is kept
            for piece in chain.pieces:
                at, index = self.offset, out.num_entries
                if isinstance(piece, Run):
                    self.run(piece)
                else:
                    self.rules([piece])
                rules.append(Run(at, self.offset, index, out.num_entries - index))
        foot = self.offset
        if chain.hook is not None:
            out.underflow[chain.hook] = foot
        if chain.foot is not None:
            self.run(chain.foot)
        else:
            self.new(self.foot_entry)
        if chain.hook is not None:
            policy = Run(foot, self.offset, out.num_entries - 1, 1)
            out.index.builtins.append(BuiltinChain(chain.name, chain.hook, rules, policy))
        else:
            bounds = (head, first, foot, self.offset, head_index, out.num_entries)
            out.index.add_user(chain.name, bounds)
            self.moved[chain.name] = first

    def run(self, run: Run) -> None:
        compiled, index = self.compiled, self.edit.index
        base = self._append(self.edit.image.entries[run.start : run.end])
        compiled.carried.append((compiled.num_entries, run.index, run.count))
        compiled.num_entries += run.count
        moved = base - run.start
        blob = compiled.blob
        first = bisect.bisect_left(index.fall_at, run.start)
        last = bisect.bisect_left(index.fall_at, run.end, first)
        if moved:
            for at in index.fall_at[first:last]:  # on to the next entry, wherever it now is
                (verdict,) = I32.unpack_from(blob, REPLACE_HEADER + at + moved)
                I32.pack_into(blob, REPLACE_HEADER + at + moved, verdict + moved)
                compiled.index.fall_at.append(at + moved)
        else:
            compiled.index.fall_at.extend(index.fall_at[first:last])
        first = bisect.bisect_left(index.jump_at, run.start)
        last = bisect.bisect_left(index.jump_at, run.end, first)
        if moved:
            compiled.index.jump_at.extend([at + moved for at in index.jump_at[first:last]])
        else:
            compiled.index.jump_at.extend(index.jump_at[first:last])
        compiled.index.jump_to.extend(index.jump_to[first:last])

    def new(self, entry: bytes) -> None:
        self._append(entry)
        self.compiled.num_entries += 1

    def rules(self, rules: list[Rule]) -> None:
        """kproxy's rules, one after the other, their targets named as libiptc expects on
        append. One loop with everything it uses at hand: it runs for every rule a sync writes."""
        out = self.compiled
        blob, at, count = out.blob, out.size, out.num_entries
        capacity = len(blob)
        write_entry, pack, names, exists = (
            self.write_entry,
            I32.pack_into,
            self.names,
            self.edit.exists,
        )
        fall_at, jump_at, jump_to = out.index.fall_at, out.index.jump_at, out.index.jump_to
        fresh = self.fresh
        try:
            for rule in rules:
                if at + MAX_ENTRY > capacity:
                    capacity = -(-2 * (at + MAX_ENTRY) // mmap.PAGESIZE) * mmap.PAGESIZE
                    blob.resize(capacity)
                size, target_offset, label = write_entry(rule, blob, at)
                verdict_at = at - REPLACE_HEADER + target_offset + ENTRY_TARGET_SIZE
                chain = None
                if not label:  # no verdict: on to the next entry
                    verdict = at - REPLACE_HEADER + size
                    fall_at.append(verdict_at)
                elif label in VERDICT_NAMES:
                    verdict = VERDICT_NAMES[label]
                elif exists(label) and label not in self.edit.builtins:
                    chain = names.setdefault(label, label)
                    verdict = 0  # set once every chain has its place
                else:
                    self._not_a_chain(rule, label)
                    at, count = at + size, count + 1
                    continue  # a target extension's, as python-iptables built it
                if size - target_offset != STANDARD_TARGET_SIZE:
                    raise self.edit.error(f"target {label} is not a standard target")
                blob[at + target_offset + 2 : at + target_offset + ENTRY_TARGET_SIZE] = _NO_NAME
                pack(blob, REPLACE_HEADER + verdict_at, verdict)
                if chain is not None:
                    fresh.append(len(jump_at))
                    jump_at.append(verdict_at)
                    jump_to.append(chain)
                at, count = at + size, count + 1
        finally:
            out.size, out.num_entries = at, count

    def _not_a_chain(self, rule: Rule, label: str) -> None:
        """A target that is not a verdict nor a user chain: an extension's, or an error."""
        if label in self.edit.builtins:
            raise self.edit.error(f"a rule jumps to built-in chain {label}")
        if rule.target is not None and rule.target.is_jump:
            raise self._missing(rule.target.name)

    def _missing(self, chain: str) -> DataplaneError:
        if chain in self.edit.deleted:
            return self.edit.error(f"can't delete chain {chain}: a rule still jumps to it")
        return self.edit.error(f"a rule jumps to chain {chain}, which does not exist")

    def resolve(self) -> None:
        """Every jump's verdict: the offset of its chain's first rule. A jump copied from the
        image already holds it unless its chain moved (or went), so only those are looked at
        in Python (picked out at C speed); kproxy's new rules' jumps are all set. For a
        one-service change that leaves most of the table's jumps alone."""
        index, moved = self.compiled.index, self.moved
        pack, jump_at, jump_to = I32.pack_into, index.jump_at, index.jump_to
        positions, bounds = index.positions, index.bounds
        for name in self.edit.deleted:
            moved[name] = GONE
            positions.pop(name, None)
        with memoryview(self.compiled.blob) as view, view[REPLACE_HEADER:] as entries:
            # GONE is -1, a first rule's offset never 0 (the built-in chains come first): both
            # true, where an unmoved chain's None is false.
            firsts = zip(jump_at, map(moved.get, jump_to), strict=True)
            for at, first in filter(itemgetter(1), firsts):
                if first == GONE:
                    raise self._missing(jump_to[jump_at.index(at)])
                pack(entries, at, first)
            for number in self.fresh:
                chain = jump_to[number]
                position = positions.get(chain)
                if position is None:
                    raise self._missing(chain)
                pack(entries, jump_at[number], bounds[position * BOUNDS + FIRST])
