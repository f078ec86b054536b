"""Where the chains and jumps are in one image of an x_tables table (IPT_SO_GET_ENTRIES), found
by reading it (`parse_index`) or known from the blob kproxy just wrote (table_blob.py).

The kernel's order: a built-in chain runs from its hook entry to its policy entry (the
underflow); a user chain from an ERROR entry naming it to a RETURN entry; the table ends with an
ERROR entry "ERROR". Other programs' entries stay bytes of the image: only standard targets are
read, because a jump (a verdict >= 0) is a byte offset that moves when anything before it moves.
Each becomes the name of the chain whose first rule it points to, or "the next entry" (a rule
without a verdict); any other offset is refused, never guessed.

An index stays true for any later image whose entries are the same bytes, counters aside (what
ImageMatch proves), so a sync that wrote a table keeps the index of what it wrote, and the next
one needs no pass over the table's entries (about a second at 10,000 services).
"""

from __future__ import annotations

import itertools
import struct
from array import array
from dataclasses import dataclass, field

from kproxy.dataplane.xtables.kernel_image import NF_INET_NUMHOOKS, TableImage
from kproxy.errors import DataplaneError

ENTRY_TARGET_SIZE = 32  # struct xt_entry_target: u16 size, char name[29], u8 revision
STANDARD_TARGET_SIZE = 40  # XT_ALIGN(sizeof(struct xt_standard_target))
XT_RETURN = -5  # -NF_REPEAT - 1
HOOK_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")  # NF_INET_* order


@dataclass(frozen=True, slots=True)
class EntryLayout:
    """Where ipt_entry (IPv4) or ip6t_entry (IPv6) keeps its offsets, from the kernel headers."""

    size: int
    target_offset_at: int


LAYOUTS = {4: EntryLayout(size=112, target_offset_at=88), 6: EntryLayout(168, 140)}


@dataclass(slots=True)
class Run:
    """Consecutive entries of an image: bytes [start, end), `count` entries from `index` on."""

    start: int
    end: int
    index: int
    count: int


@dataclass(slots=True)
class BuiltinChain:
    name: str
    hook: int
    rules: list[Run]  # one per rule
    policy: Run


# A user chain's numbers in TableIndex.bounds: its ERROR entry, first rule, RETURN entry and
# end (offsets), and the index of its ERROR entry and of the entry after its RETURN.
HEAD, FIRST, FOOT, END, HEAD_INDEX, END_INDEX = range(6)
BOUNDS = 6


@dataclass
class TableIndex:
    builtins: list[BuiltinChain] = field(default_factory=list)  # in the image's order
    names: list[str] = field(default_factory=list)  # user chains, in the image's order
    bounds: array[int] = field(default_factory=lambda: array("I"))  # BOUNDS per user chain
    positions: dict[str, int] = field(default_factory=dict)  # user chain -> number in names
    jump_at: array[int] = field(default_factory=lambda: array("I"))  # verdicts that jump
    jump_to: list[str] = field(default_factory=list)  # ... to these chains' first rules
    fall_at: array[int] = field(default_factory=lambda: array("I"))  # verdicts: the next entry
    end: Run = field(default_factory=lambda: Run(0, 0, 0, 0))  # the ERROR entry ending it
    # Whether `names` is in libiptc's order (by name): None until someone asks (sorted_names).
    in_order: bool | None = None

    def sorted_names(self) -> bool:
        """Whether the user chains are in libiptc's order (by name), found once per index."""
        if self.in_order is None:
            self.in_order = all(a < b for a, b in itertools.pairwise(self.names))
        return self.in_order

    def bound(self, number: int, which: int) -> int:
        return self.bounds[number * BOUNDS + which]

    def add_user(self, name: str, bounds: tuple[int, int, int, int, int, int]) -> None:
        self.positions[name] = len(self.names)
        self.names.append(name)
        self.bounds.extend(bounds)


def refuse(table: str, why: str) -> DataplaneError:
    return DataplaneError(f"table {table}: {why}; kproxy does not write a table it cannot read")


def parse_index(image: TableImage) -> TableIndex:
    """Read the chains and jumps of `image`; DataplaneError for anything unexpected."""
    layout, name, entries = LAYOUTS[image.family], image.name, image.entries
    valid, *points = struct.unpack_from(f"={2 * NF_INET_NUMHOOKS + 1}I", image.hooks)
    hooks = [h for h in range(NF_INET_NUMHOOKS) if valid & (1 << h)]
    starts = {points[h]: h for h in hooks}
    underflows = {points[NF_INET_NUMHOOKS + h] for h in hooks}
    index = TableIndex()
    builtin: BuiltinChain | None = None
    user: tuple[str, int, int] | None = None  # name, head offset, head index
    last = (0, 0, False)  # the previous entry: offset, index, whether a plain RETURN
    forward: list[tuple[int, int]] = []  # (number in jump_to, verdict) until heads are known
    heads: dict[int, str] = {}  # a user chain's first rule -> its name
    seen: set[str] = set()
    offset = number = 0
    size = len(entries)
    offsets = struct.Struct("=HH").unpack_from
    verdict_of = struct.Struct("=i").unpack_from
    while offset < size:
        if offset + layout.size > size:
            raise refuse(name, f"entry at {offset} is cut short")
        target_offset, next_offset = offsets(entries, offset + layout.target_offset_at)
        target = offset + target_offset
        if target_offset < layout.size or target_offset + ENTRY_TARGET_SIZE > next_offset:
            raise refuse(name, f"entry at {offset} has a malformed target")
        if offset + next_offset > size:
            raise refuse(name, f"entry at {offset} runs past the table's end")
        is_error = is_return = False
        if entries[target + 2] == 0:  # the standard target: its name is empty
            if next_offset - target_offset < STANDARD_TARGET_SIZE:
                raise refuse(name, f"standard target at {offset} is too small")
            (verdict,) = verdict_of(entries, target + ENTRY_TARGET_SIZE)
            if verdict == offset + next_offset:
                index.fall_at.append(target + ENTRY_TARGET_SIZE)
            elif verdict >= 0:
                forward.append((len(index.jump_to), verdict))
                index.jump_at.append(target + ENTRY_TARGET_SIZE)
                index.jump_to.append("")
            is_return = verdict == XT_RETURN and target_offset == layout.size
        else:
            is_error = bytes(entries[target + 2 : target + 8]) == b"ERROR\0"
        if user is not None and (is_error or offset in starts):
            # A user chain ends at the entry before the next chain begins: its RETURN.
            last_offset, last_number, last_return = last
            chain_name, head, head_number = user
            first = head + _next(entries, layout, head)
            if not last_return or last_offset < first:
                raise refuse(name, f"user chain {chain_name} does not end with RETURN")
            index.add_user(
                chain_name, (head, first, last_offset, offset, head_number, last_number + 1)
            )
            user = None
        if builtin is None and user is None:
            if offset in starts:
                hook = starts[offset]
                builtin = BuiltinChain(HOOK_CHAINS[hook], hook, [], Run(0, 0, 0, 0))
            elif is_error:
                label = _c_string(entries[target + ENTRY_TARGET_SIZE : target + next_offset])
                if label == "ERROR" and offset + next_offset == size:
                    index.end = Run(offset, size, number, 1)
                    number += 1
                    break
                if label in seen or label in HOOK_CHAINS:
                    raise refuse(name, f"chain {label} appears twice")
                seen.add(label)
                user = (label, offset, number)
                heads[offset + next_offset] = label
                last = (offset, number, False)
                offset += next_offset
                number += 1
                continue
            else:
                raise refuse(name, f"entry at {offset} belongs to no chain")
        if builtin is not None:
            run = Run(offset, offset + next_offset, number, 1)
            if offset in underflows:
                builtin.policy = run
                index.builtins.append(builtin)
                builtin = None
            elif is_error or (offset in starts and offset != _first(builtin, run)):
                raise refuse(name, f"built-in chain {builtin.name} has no policy entry")
            else:
                builtin.rules.append(run)
        last = (offset, number, is_return)
        offset += next_offset
        number += 1
    if index.end.end != size or number != image.num_entries:
        raise refuse(name, "the table does not end with its ERROR entry")
    for jump, verdict in forward:
        chain = heads.get(verdict)
        if chain is None:
            raise refuse(name, f"a rule jumps to {verdict}, neither the next rule nor a chain")
        index.jump_to[jump] = chain
    return index


def _next(entries: memoryview, layout: EntryLayout, offset: int) -> int:
    (step,) = struct.unpack_from("=H", entries, offset + layout.target_offset_at + 2)
    return int(step)


def _first(chain: BuiltinChain, run: Run) -> int:
    return chain.rules[0].start if chain.rules else run.start


def _c_string(raw: bytes | memoryview) -> str:
    data = bytes(raw)
    end = data.find(b"\0")
    return (data if end < 0 else data[:end]).decode(errors="replace")
