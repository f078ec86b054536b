"""What one sync sends for one family's table: a TableDelta (chains to add, rewrite and delete,
sets to add and delete, elements to add and delete), worked out from kproxy's in-memory copy of
its last commit, and turned into netlink messages in an order the kernel accepts inside one
transaction."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables.families import NFPROTO
from kproxy.dataplane.nftables.netlink import NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL
from kproxy.plan.nftables.ir import Chain, Element, NamedSet, NftTable, TableChanges

NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_DELCHAIN = 5
NFT_MSG_NEWRULE = 6
NFT_MSG_DELRULE = 8
NFT_MSG_NEWSET = 9
NFT_MSG_DELSET = 11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14

Msg = tuple[int, int, int, bytes]  # (message type, flags, nfproto family, attributes)


@dataclass
class TableImage:
    """A table as kproxy committed it: definitions by name, elements by set."""

    comment: str | None = None
    sets: dict[str, NamedSet] = field(default_factory=dict)
    elements: dict[str, frozenset[Element]] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)

    @classmethod
    def of(cls, table: NftTable) -> TableImage:
        return cls(
            table.comment,
            {s.name: s for s in table.sets},
            dict(table.elements),
            {c.name: c for c in table.chains},
        )

    def patch(self, table: NftTable, changes: TableChanges) -> None:
        """Become `table`'s image, from its base's, where `changes` says they may differ."""
        for s in changes.sets:
            self.sets[s.name] = s
        for name in changes.dropped_sets:
            self.sets.pop(name, None)
            self.elements.pop(name, None)
        for name in changes.elements:
            self._take_elements(table, name)
        for chain in changes.chains:
            self.chains[chain.name] = chain
        for name in changes.dropped_chains:
            self.chains.pop(name, None)

    def _take_elements(self, table: NftTable, name: str) -> None:
        elements = table.elements.get(name)
        if elements:
            self.elements[name] = elements
        else:
            self.elements.pop(name, None)


@dataclass
class TableDelta:
    family: int
    table: str
    recreate: bool = False  # drop whatever the table holds and write it whole
    create: bool = False  # create the table, which must not exist yet
    fresh: bool = False  # the kernel holds no such table: it may be written in stages
    comment: str | None = None
    add_sets: list[NamedSet] = field(default_factory=list)
    delete_sets: list[str] = field(default_factory=list)
    add_chains: list[Chain] = field(default_factory=list)
    rewrite_chains: list[Chain] = field(default_factory=list)
    delete_chains: list[str] = field(default_factory=list)
    add_elements: dict[str, list[Element]] = field(default_factory=dict)
    delete_elements: dict[str, list[Element]] = field(default_factory=dict)
    unchanged_chains: int = 0
    read_kernel: bool = False

    @property
    def empty(self) -> bool:
        return not (
            self.recreate
            or self.create
            or self.add_sets
            or self.delete_sets
            or self.add_chains
            or self.rewrite_chains
            or self.delete_chains
            or any(self.add_elements.values())
            or any(self.delete_elements.values())
        )


def diff_tables(desired: NftTable, current: TableImage) -> TableDelta:
    """The changes that turn `current` (kproxy's last commit) into `desired`."""
    delta = TableDelta(desired.family, desired.name)
    wanted_sets = {s.name: s for s in desired.sets}
    recreated: set[str] = set()
    for name, s in wanted_sets.items():
        defined = current.sets.get(name)
        if defined is None or defined != s:
            if defined is not None:
                delta.delete_sets.append(name)
                recreated.add(name)
            delta.add_sets.append(s)
    delta.delete_sets.extend(n for n in current.sets if n not in wanted_sets)
    for name, s in wanted_sets.items():
        if s.dynamic:
            continue
        want = desired.elements.get(name, frozenset())
        held = frozenset() if name in recreated else current.elements.get(name, frozenset())
        if want is held or want == held:
            continue
        _changed_elements(delta, name, want, held)
    wanted_chains = {}
    for chain in desired.chains:
        wanted_chains[chain.name] = chain
        old = current.chains.get(chain.name)
        if old is None:
            delta.add_chains.append(chain)
        elif old is chain or old == chain:
            delta.unchanged_chains += 1
        else:
            delta.rewrite_chains.append(chain)
    delta.delete_chains = [n for n in current.chains if n not in wanted_chains]
    return delta


def diff_changes(desired: NftTable, current: TableImage, changes: TableChanges) -> TableDelta:
    """diff_tables for a table patched from the one `current` is the image of: only where
    `changes` says the two may differ."""
    delta = TableDelta(desired.family, desired.name)
    recreated: set[str] = set()
    for s in changes.sets:
        defined = current.sets.get(s.name)
        if defined is None or defined != s:
            if defined is not None:
                delta.delete_sets.append(s.name)
                recreated.add(s.name)
            delta.add_sets.append(s)
    delta.delete_sets.extend(n for n in changes.dropped_sets if n in current.sets)
    redefined = {s.name: s for s in changes.sets}
    dropped = set(changes.dropped_sets)
    for name in dict.fromkeys((*changes.elements, *recreated)):
        named = redefined.get(name) or (None if name in dropped else current.sets.get(name))
        if named is None or named.dynamic:
            continue
        want = desired.elements.get(name, frozenset())
        held = frozenset() if name in recreated else current.elements.get(name, frozenset())
        if want is not held and want != held:
            _changed_elements(delta, name, want, held)
    for chain in changes.chains:
        old = current.chains.get(chain.name)
        if old is None:
            delta.add_chains.append(chain)
        elif old is not chain and old != chain:
            delta.rewrite_chains.append(chain)
    delta.delete_chains = [n for n in changes.dropped_chains if n in current.chains]
    written = len(delta.add_chains) + len(delta.rewrite_chains)
    delta.unchanged_chains = len(desired.chains) - written
    return delta


def _changed_elements(
    delta: TableDelta, name: str, want: frozenset[Element], have: frozenset[Element]
) -> None:
    gone = have - want
    added = want - have
    if gone:
        delta.delete_elements[name] = sorted(gone, key=_element_order)
    if added:
        delta.add_elements[name] = sorted(added, key=_element_order)


def _element_order(element: Element) -> tuple[str, ...]:
    return element.key


def full_delta(desired: NftTable) -> TableDelta:
    """Write the table whole, replacing whatever a table of that name holds."""
    delta = diff_tables(desired, TableImage())
    delta.recreate = True
    delta.comment = desired.comment
    return delta


def _table_msgs(family: int, name: str, comment: str | None) -> list[Msg]:
    """Create the table if missing, delete it, create it afresh: one transaction, so packets see
    the old table or the new one, never neither."""
    fam = NFPROTO[family]
    return [
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, fam, e.table_attrs(name)),
        (NFT_MSG_DELTABLE, 0, fam, e.table_name_attrs(name)),
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, fam, e.table_attrs(name, comment)),
    ]


def delta_messages(delta: TableDelta, set_ids: Iterator[int]) -> Iterator[Msg]:
    """Flush what changes, delete what goes (elements before the chains they point to), add
    sets, chains, rules and elements, then delete the chains nothing points to any more."""
    fam, table, family = NFPROTO[delta.family], delta.table, delta.family
    if delta.recreate:
        yield from _table_msgs(family, table, delta.comment)
    elif delta.create:
        attrs = e.table_attrs(table, delta.comment)
        yield (NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, fam, attrs)
    for name in (*(c.name for c in delta.rewrite_chains), *delta.delete_chains):
        yield (NFT_MSG_DELRULE, 0, fam, e.rule_chain_attrs(table, name))
    for name, elements in delta.delete_elements.items():
        for attrs in e.element_batches(table, name, elements, with_data=False):
            yield (NFT_MSG_DELSETELEM, 0, fam, attrs)
    for set_name in delta.delete_sets:
        yield (NFT_MSG_DELSET, 0, fam, e.set_name_attrs(table, set_name))
    for s in delta.add_sets:
        yield (NFT_MSG_NEWSET, NLM_F_CREATE, fam, e.set_attrs(table, s, next(set_ids)))
    for chain in delta.add_chains:
        yield (NFT_MSG_NEWCHAIN, NLM_F_CREATE, fam, e.chain_attrs(table, chain))
    flags = NLM_F_CREATE | NLM_F_APPEND
    for chain in (*delta.add_chains, *delta.rewrite_chains):
        head = e.rule_chain_attrs(table, chain.name)
        for rule in chain.rules:
            yield (NFT_MSG_NEWRULE, flags, fam, head + e.encode_rule_body(rule, family))
    for name, elements in delta.add_elements.items():
        for attrs in e.element_batches(table, name, elements):
            yield (NFT_MSG_NEWSETELEM, NLM_F_CREATE, fam, attrs)
    for chain_name in delta.delete_chains:
        yield (NFT_MSG_DELCHAIN, 0, fam, e.chain_name_attrs(table, chain_name))
