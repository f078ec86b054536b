"""One x_tables table edited on the kernel's own image of it and compiled into the blob the
kernel replaces it with: what libiptc does for iptables-legacy, done for kproxy's changes only.

`TableEdit.apply` carries out a TableChanges as libiptc's calls did (remove jumps, create, flush
and append, flush and delete, insert jumps, with libiptc's refusals), and `compile` lays the
table out as libiptc does (built-in chains in the image's order, then user chains by name),
copying every chain nobody edited straight from the image, and turns chain names back into
offsets: a jump's verdict is the offset of its chain's first rule, a rule without a verdict
goes on to the next entry. Every entry carried over keeps its place in the image's count, so
that its packet counters can be given back after the replace (kernel_write.py), and the blob's
own index is known without reading it again (table_index.py).
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from kproxy.dataplane.xtables.diff import TableChanges
from kproxy.dataplane.xtables.entries import MAX_ENTRY
from kproxy.dataplane.xtables.kernel_image import NF_INET_NUMHOOKS, TableImage
from kproxy.dataplane.xtables.table_index import (
    BOUNDS,
    END,
    END_INDEX,
    ENTRY_TARGET_SIZE,
    FIRST,
    FOOT,
    HEAD,
    HEAD_INDEX,
    LAYOUTS,
    STANDARD_TARGET_SIZE,
    XT_RETURN,
    BuiltinChain,
    EntryLayout,
    Run,
    TableIndex,
    parse_index,
)
from kproxy.errors import DataplaneError
from kproxy.rules.ir import Rule

ERROR_TARGET_SIZE = 64  # XT_ALIGN(sizeof(struct xt_error_target))
MAX_CHAIN_NAME = 28  # what libiptc accepts (XT_EXTENSION_MAXNAMELEN - 1)
REPLACE_HEADER = 96  # sizeof(struct ipt_replace) == sizeof(struct ip6t_replace)
# Verdicts of the standard target (negative: -NF_<verdict> - 1).
VERDICTS = {b"DROP": -1, b"ACCEPT": -2, b"QUEUE": -4, b"RETURN": XT_RETURN}
VERDICT_NAMES = {name.decode(): verdict for name, verdict in VERDICTS.items()}
_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")
_NO_NAME = bytes(ENTRY_TARGET_SIZE - 2)  # a standard target's name and revision


def _empty_entry(layout: EntryLayout, target_size: int) -> bytes:
    """The entry, without its target, of a chain's head or foot as libiptc makes them: it
    matches every packet."""
    header = bytearray(layout.size)
    _U16.pack_into(header, layout.target_offset_at, layout.size)
    _U16.pack_into(header, layout.target_offset_at + 2, layout.size + target_size)
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
class _Chain:
    """A chain being edited: built-in (`hook`), or a user chain taken out of the index."""

    name: str
    hook: int | None
    head: Run | None  # a user chain's ERROR entry (None: make one)
    pieces: list[Piece]
    foot: Run | None  # the policy entry, or a user chain's RETURN (None: make one)


class TableEdit:
    """A table read from `image` (through `index` when one is known for it), then edited."""

    def __init__(self, image: TableImage, index: TableIndex | None = None) -> None:
        self.image = image
        self.layout = LAYOUTS[image.family]
        self.index = index if index is not None else parse_index(image)
        self.builtins = {
            c.name: _Chain(c.name, c.hook, None, list(c.rules), c.policy)
            for c in self.index.builtins
        }
        self.edited: dict[str, _Chain] = {}  # user chains created, or taken out to be edited
        self.gone: set[str] = set()  # the index's user chains taken out (edited or deleted)
        self.deleted: set[str] = set()

    def error(self, why: str) -> DataplaneError:
        return DataplaneError(f"writing table {self.image.name} failed: {why}")

    def _exists(self, name: str) -> bool:
        return (
            name in self.builtins
            or name in self.edited
            or (name in self.index.positions and name not in self.gone)
        )

    def _chain(self, name: str) -> _Chain:
        chain = self.builtins.get(name) or self.edited.get(name)
        if chain is not None:
            return chain
        number = self.index.positions.get(name)
        if number is None or name in self.gone:
            raise self.error(f"no chain {name}")
        at = self.index.bound
        first, foot = at(number, FIRST), at(number, FOOT)
        head_index, end_index = at(number, HEAD_INDEX), at(number, END_INDEX)
        rules = end_index - head_index - 2
        chain = _Chain(
            name,
            None,
            Run(at(number, HEAD), first, head_index, 1),
            [Run(first, foot, head_index + 1, rules)] if rules else [],
            Run(foot, at(number, END), end_index - 1, 1),
        )
        self.edited[name] = chain
        self.gone.add(name)
        return chain

    def apply(self, changes: TableChanges) -> None:
        """Carry out `changes` in the order and with the refusals of libiptc's calls."""
        for name, positions in changes.remove_jumps.items():
            chain = self._chain(name)
            chain.pieces = [rule for piece in chain.pieces for rule in self._rules(piece)]
            for pos in sorted(positions, reverse=True):
                if pos >= len(chain.pieces):
                    raise self.error(f"can't delete rule {pos} of {name}: no such rule")
                del chain.pieces[pos]
        for name in sorted(changes.create):
            if self._exists(name):
                raise self.error(f"can't create chain {name}: it exists")
            if not 0 < len(name.encode()) <= MAX_CHAIN_NAME or name.encode() in VERDICTS:
                raise self.error(f"can't create chain {name}: invalid name")
            self.edited[name] = _Chain(name, None, None, [], None)
        created = set(changes.create)
        for wanted in changes.write:
            chain = self._chain(wanted.name)
            if wanted.name not in created:
                chain.pieces = []
            chain.pieces.extend(wanted.rules)
        for name in changes.delete:
            self._chain(name).pieces = []
        for name in changes.delete:
            if name in self.builtins:
                raise self.error(f"can't delete built-in chain {name}")
            self._chain(name)
            del self.edited[name]
            self.deleted.add(name)
        for jump in changes.insert_jumps:
            chain = self._chain(jump.chain)
            if jump.append:
                chain.pieces.append(jump.rule)
            else:
                chain.pieces.insert(0, jump.rule)

    def _rules(self, piece: Piece) -> list[Piece]:
        """`piece` cut into one piece per rule, so that positions count rules."""
        if not isinstance(piece, Run) or piece.count <= 1:
            return [piece]
        out: list[Piece] = []
        offset, index = piece.start, piece.index
        at = self.layout.target_offset_at + 2
        while offset < piece.end:
            (step,) = _U16.unpack_from(self.image.entries, offset + at)
            out.append(Run(offset, offset + step, index, 1))
            offset, index = offset + step, index + 1
        return out

    def _user_order(self) -> list[_Chain | tuple[int, int]]:
        """The user chains in libiptc's order (by name; UTF-8 keeps code point order): edited
        ones, and blocks of the index's chains that stay next to each other in the image."""
        index, order = self.index, sorted(self.edited.values(), key=lambda c: c.name)
        names = index.names
        if any(a >= b for a, b in itertools.pairwise(names)):  # not kproxy's or libiptc's layout
            everything: list[_Chain | tuple[str, int]] = [*order]
            everything += [(n, i) for i, n in enumerate(names) if n not in self.gone]
            everything.sort(key=lambda c: c.name if isinstance(c, _Chain) else c[0])
            return [c if isinstance(c, _Chain) else (c[1], c[1] + 1) for c in everything]
        out: list[_Chain | tuple[int, int]] = []
        stops = sorted({index.positions[n] for n in self.gone})
        at = 0
        for chain in [*order, None]:
            until = len(names) if chain is None else bisect.bisect_left(names, chain.name)
            for stop in stops[bisect.bisect_left(stops, at) : bisect.bisect_left(stops, until)]:
                out.extend(self._blocks(at, stop))
                at = stop + 1
            out.extend(self._blocks(at, until))
            at = max(at, until)
            if chain is not None:
                out.append(chain)
        return out

    def _blocks(self, first: int, last: int) -> list[tuple[int, int]]:
        """Chains `first` to `last` - 1 cut where they are not next to each other in the image."""
        if first >= last:
            return []
        bounds = self.index.bounds
        ends = bounds[first * BOUNDS + END : (last - 1) * BOUNDS + END : BOUNDS]
        heads = bounds[(first + 1) * BOUNDS + HEAD : last * BOUNDS + HEAD : BOUNDS]
        if ends == heads:
            return [(first, last)]
        return [(n, n + 1) for n in range(first, last)]

    def compile(self, write_entry: WriteEntry) -> Compiled:
        """The blob for IPT_SO_SET_REPLACE (its header left for the caller)."""
        index = self.index
        # Room for the image and every new rule at up to 1 KiB (kproxy's are under half that):
        # only what is written of it is ever in memory.
        chains = [*self.builtins.values(), *self.edited.values()]
        new = sum(1 for c in chains for p in c.pieces if not isinstance(p, Run))
        capacity = REPLACE_HEADER + len(self.image.entries) + (new + 2 * len(chains)) * 1024
        out = _Output(self, write_entry, capacity)
        try:
            for builtin in self.builtins.values():
                out.chain(builtin)
            for item in self._user_order():
                if isinstance(item, _Chain):
                    out.chain(item)
                else:
                    out.kept_block(*item)
            out.run(index.end)
            out.compiled.index.end = Run(
                out.offset - (index.end.end - index.end.start),
                out.offset,
                out.compiled.num_entries - 1,
                1,
            )
            out.resolve()
        except BaseException:
            out.compiled.close()
            raise
        return out.compiled


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


class _Output:
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
        for column, shift in ((HEAD, moved), (FIRST, moved), (FOOT, moved), (END, moved)):
            bounds[column::BOUNDS] = array("I", [at + shift for at in bounds[column::BOUNDS]])
        for column in (HEAD_INDEX, END_INDEX):
            bounds[column::BOUNDS] = array("I", [n + renumbered for n in bounds[column::BOUNDS]])
        names = index.names[first:last]
        numbers = range(len(out.names), len(out.names) + len(names))
        out.positions.update(zip(names, numbers, strict=True))
        out.names += names
        start = index.bound(first, HEAD)
        head_index = index.bound(first, HEAD_INDEX)
        count = index.bound(last - 1, END_INDEX) - head_index
        self.run(Run(start, index.bound(last - 1, END), head_index, count))
        out.bounds += bounds

    def chain(self, chain: _Chain) -> None:
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

    def run(self, run: Run) -> None:
        compiled, index = self.compiled, self.edit.index
        base = self._append(self.edit.image.entries[run.start : run.end])
        compiled.carried.append((compiled.num_entries, run.index, run.count))
        compiled.num_entries += run.count
        moved = base - run.start
        blob = compiled.blob
        first = bisect.bisect_left(index.fall_at, run.start)
        last = bisect.bisect_left(index.fall_at, run.end, first)
        for at in index.fall_at[first:last]:  # on to the next entry, wherever it now is
            (verdict,) = _I32.unpack_from(blob, REPLACE_HEADER + at + moved)
            _I32.pack_into(blob, REPLACE_HEADER + at + moved, verdict + moved)
            compiled.index.fall_at.append(at + moved)
        first = bisect.bisect_left(index.jump_at, run.start)
        last = bisect.bisect_left(index.jump_at, run.end, first)
        compiled.index.jump_at.extend([at + moved for at in index.jump_at[first:last]])
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
            _I32.pack_into,
            self.names,
            self.edit._exists,
        )
        fall_at, jump_at, jump_to = out.index.fall_at, out.index.jump_at, out.index.jump_to
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
        """Every jump's verdict: the offset of its chain's first rule."""
        index, pack = self.compiled.index, _I32.pack_into
        starts = dict(zip(index.names, index.bounds[FIRST::BOUNDS], strict=True))
        try:
            firsts = [starts[chain] for chain in index.jump_to]
        except KeyError as missing:
            raise self._missing(missing.args[0]) from None
        with memoryview(self.compiled.blob) as view, view[REPLACE_HEADER:] as entries:
            for at, first in zip(index.jump_at, firsts, strict=True):
                pack(entries, at, first)
