"""One x_tables table edited on the kernel's own image of it and compiled into the blob the
kernel replaces it with: what libiptc does for iptables-legacy, done for kproxy's changes only.

`TableEdit.apply` carries out a TableChanges as libiptc's calls did (remove jumps, create, flush
and append, flush and delete, insert jumps, with libiptc's refusals), and `compile` lays the
table out as libiptc does (built-in chains in the image's order, then user chains by name),
copying every chain nobody edited straight from the image, in blocks where they stay next to
each other, and hands the writing of the blob to table_compile.py, which turns chain names back
into offsets: a jump's verdict is the offset of its chain's first rule, a rule without a verdict
goes on to the next entry. Every entry carried over keeps its place in the image's count, so
that its packet counters can be given back after the replace (kernel_write.py), and the blob's
own index is known without reading it again (table_index.py).
"""

from __future__ import annotations

import bisect

from kproxy.dataplane.xtables.diff import TableChanges
from kproxy.dataplane.xtables.kernel_image import TableImage
from kproxy.dataplane.xtables.table_compile import (
    REPLACE_HEADER,
    U16,
    VERDICTS,
    BlobOutput,
    Compiled,
    EditedChain,
    Piece,
    WriteEntry,
)
from kproxy.dataplane.xtables.table_index import (
    BOUNDS,
    END,
    END_INDEX,
    FIRST,
    FOOT,
    HEAD,
    HEAD_INDEX,
    LAYOUTS,
    Run,
    TableIndex,
    parse_index,
)
from kproxy.errors import DataplaneError

MAX_CHAIN_NAME = 28  # what libiptc accepts (XT_EXTENSION_MAXNAMELEN - 1)


class TableEdit:
    """A table read from `image` (through `index` when one is known for it), then edited."""

    def __init__(self, image: TableImage, index: TableIndex | None = None) -> None:
        self.image = image
        self.layout = LAYOUTS[image.family]
        self.index = index if index is not None else parse_index(image)
        self.builtins = {
            c.name: EditedChain(c.name, c.hook, None, list(c.rules), c.policy)
            for c in self.index.builtins
        }
        self.edited: dict[str, EditedChain] = {}  # user chains created, or taken out to be edited
        self.gone: set[str] = set()  # the index's user chains taken out (edited or deleted)
        self.deleted: set[str] = set()

    def error(self, why: str) -> DataplaneError:
        return DataplaneError(f"writing table {self.image.name} failed: {why}")

    def exists(self, name: str) -> bool:
        return (
            name in self.builtins
            or name in self.edited
            or (name in self.index.positions and name not in self.gone)
        )

    def _chain(self, name: str) -> EditedChain:
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
        chain = EditedChain(
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
            if self.exists(name):
                raise self.error(f"can't create chain {name}: it exists")
            if not 0 < len(name.encode()) <= MAX_CHAIN_NAME or name.encode() in VERDICTS:
                raise self.error(f"can't create chain {name}: invalid name")
            self.edited[name] = EditedChain(name, None, None, [], None)
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
            (step,) = U16.unpack_from(self.image.entries, offset + at)
            out.append(Run(offset, offset + step, index, 1))
            offset, index = offset + step, index + 1
        return out

    def _user_order(self) -> list[EditedChain | tuple[int, int]]:
        """The user chains in libiptc's order (by name; UTF-8 keeps code point order): edited
        ones, and blocks of the index's chains that stay next to each other in the image."""
        index, order = self.index, sorted(self.edited.values(), key=lambda c: c.name)
        names = index.names
        if not index.sorted_names():  # not kproxy's or libiptc's layout
            everything: list[EditedChain | tuple[str, int]] = [*order]
            everything += [(n, i) for i, n in enumerate(names) if n not in self.gone]
            everything.sort(key=lambda c: c.name if isinstance(c, EditedChain) else c[0])
            return [c if isinstance(c, EditedChain) else (c[1], c[1] + 1) for c in everything]
        out: list[EditedChain | tuple[int, int]] = []
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
        out = BlobOutput(self, write_entry, capacity)
        try:
            for builtin in self.builtins.values():
                out.chain(builtin)
            for item in self._user_order():
                if isinstance(item, EditedChain):
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
            out.compiled.index.in_order = True  # either path above lays the chains out by name
        except BaseException:
            out.compiled.close()
            raise
        return out.compiled
