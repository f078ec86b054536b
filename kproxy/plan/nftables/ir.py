"""The nftables mode's IR: one table of kproxy's own, with its chains (some hooked into the
netfilter hooks), its rules as small typed statements, and its named sets and verdict maps.

Pure values, compared by equality: the dataplane diffs two of them to know what to send, the
renderer prints one as `nft list table` does, the encoder turns each statement into bytecode.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, overload


class Key(enum.Enum):
    """A packet field a statement reads."""

    SADDR = "saddr"
    DADDR = "daddr"
    L4PROTO = "meta l4proto"
    DPORT = "th dport"
    IIFNAME = "iifname"


@dataclass(frozen=True, slots=True)
class Match:
    """`ip saddr 10.0.0.0/8`, `meta l4proto tcp`, `iifname != "cbr0"` (`veth+` is a prefix)."""

    key: Key
    value: str
    negate: bool = False


@dataclass(frozen=True, slots=True)
class PortMatch:
    """`tcp dport 80`: the protocol and the transport header's destination port."""

    proto: str
    port: int


@dataclass(frozen=True, slots=True)
class CtStateNew:
    """`ct state new`."""


@dataclass(frozen=True, slots=True)
class FibLocal:
    """`fib saddr type local` / `fib daddr type local`: the address is one of the node's."""

    key: Key


@dataclass(frozen=True, slots=True)
class MarkClear:
    """`meta mark & MASK == 0`."""

    mask: int


@dataclass(frozen=True, slots=True)
class NumgenZero:
    """`numgen random mod N 0`: true with probability 1/N."""

    modulus: int


@dataclass(frozen=True, slots=True)
class Lookup:
    """`ip saddr @set`: the key is in a named set."""

    keys: tuple[Key, ...]
    set_name: str


@dataclass(frozen=True, slots=True)
class Vmap:
    """`ip daddr . meta l4proto . th dport vmap @map`: the verdict of the matching element."""

    keys: tuple[Key, ...]
    map_name: str


class Verdict(NamedTuple):
    """`jump X`, `goto X`, `return`, `drop`, `accept`. A tuple: tens of thousands of map
    elements hold one, and the diff hashes them all."""

    kind: str
    chain: str | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """`reject`: ICMP(v6) port unreachable."""


@dataclass(frozen=True, slots=True)
class Dnat:
    """`dnat to IP:PORT` (after a `meta l4proto` match)."""

    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class Masquerade:
    """`masquerade fully-random`."""


@dataclass(frozen=True, slots=True)
class MarkSet:
    """`meta mark set meta mark | VALUE` (op "|") or `^ VALUE` (op "^")."""

    op: str
    value: int


@dataclass(frozen=True, slots=True)
class Update:
    """`update @set { ip saddr }`: remember the source in a dynamic set."""

    set_name: str
    key: Key


Statement = (
    Match
    | PortMatch
    | CtStateNew
    | FibLocal
    | MarkClear
    | NumgenZero
    | Lookup
    | Vmap
    | Verdict
    | Reject
    | Dnat
    | Masquerade
    | MarkSet
    | Update
)


@dataclass(frozen=True, slots=True)
class Rule:
    statements: tuple[Statement, ...]
    comment: str | None = None


class DerivedRules(Sequence[Rule]):
    """A chain's rules kept as the few values they are made of, and made when read: a table
    has a quarter of a million endpoint chains, and their rules as objects would be about ten
    small objects per endpoint, kept by the plan for every later sync. Equal to any sequence
    holding the same rules; two of one kind compare by their values alone."""

    __slots__ = ()

    def values(self) -> tuple[object, ...]:
        raise NotImplementedError

    def build(self) -> tuple[Rule, ...]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.build())

    @overload
    def __getitem__(self, index: int) -> Rule: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Rule, ...]: ...
    def __getitem__(self, index: int | slice) -> Rule | tuple[Rule, ...]:
        return self.build()[index]

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.build())

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            assert isinstance(other, DerivedRules)
            return self.values() == other.values()
        if isinstance(other, Sequence):
            return self.build() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.build())

    def __repr__(self) -> str:
        return repr(self.build())


@dataclass(frozen=True, slots=True)
class Hook:
    """A base chain's `type T hook H priority P; policy accept;`."""

    type: str
    hook: str
    priority: int


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    rules: Sequence[Rule] = ()
    hook: Hook | None = None
    comment: str | None = None


class Element(NamedTuple):
    """A set element (`key` fields joined by ` . `), and for a verdict map its verdict."""

    key: tuple[str, ...]
    verdict: Verdict | None = None


@dataclass(frozen=True, slots=True)
class NamedSet:
    """A named set, or a verdict map when `verdict_map`; key types as nft names them."""

    name: str
    key_types: tuple[str, ...]
    verdict_map: bool = False
    flags: tuple[str, ...] = ()  # "dynamic", "timeout", "interval"
    timeout: int | None = None  # seconds
    size: int | None = None
    comment: str | None = None

    @property
    def dynamic(self) -> bool:
        """Its elements are the kernel's (added by packets), never kproxy's."""
        return "dynamic" in self.flags


@dataclass(frozen=True, slots=True)
class TableChanges:
    """Where a table planned by patching its predecessor (`base`) may differ from it; nothing
    outside these differs. A hint for the dataplane, which may always diff the whole table."""

    base: weakref.ref[NftTable]
    chains: tuple[Chain, ...] = ()  # chains that are new or may have changed, in table order
    dropped_chains: tuple[str, ...] = ()  # in the base's order
    sets: tuple[NamedSet, ...] = ()  # sets that are new or may have changed, in table order
    dropped_sets: tuple[str, ...] = ()  # in the base's order
    elements: tuple[str, ...] = ()  # sets and maps whose elements may have changed


@dataclass(frozen=True)
class NftTable:
    """One family's `kube-proxy` table. Elements are kept apart from the set definitions so
    a changed element never looks like a changed set. `changes` is no part of its value."""

    family: int
    name: str
    comment: str | None = None
    sets: tuple[NamedSet, ...] = ()
    elements: dict[str, frozenset[Element]] = field(default_factory=dict)
    chains: tuple[Chain, ...] = ()
    changes: TableChanges | None = field(default=None, compare=False, repr=False)

    @property
    def nft_family(self) -> str:
        return "ip" if self.family == 4 else "ip6"

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.chains if c.name == name), None)

    def named_set(self, name: str) -> NamedSet | None:
        return next((s for s in self.sets if s.name == name), None)
