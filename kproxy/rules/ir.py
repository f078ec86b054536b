"""The rule IR: what kproxy wants in a netfilter table, independent of how it gets there.

A Rule holds the same pieces, in the same order, as one line of `iptables-save` output, so that
rendering is a straight walk and comparing with what the kernel holds is a string comparison.
Values are kept in the canonical form the kernel reports back (`10.0.0.1/32`, not `10.0.0.1`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Chains every table of a family already has; kproxy never creates, flushes or deletes them.
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
}

# The order in which kproxy prints tables, whether planned or read back from the kernel.
TABLE_ORDER = ("raw", "mangle", "filter", "nat")


def table_rank(name: str) -> int:
    return TABLE_ORDER.index(name) if name in TABLE_ORDER else len(TABLE_ORDER)


# Targets that are verdicts rather than jumps to a user chain.
STANDARD_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})

# Target extensions kproxy writes; anything else in a target position is a chain name.
EXTENSION_TARGETS = frozenset({"DNAT", "SNAT", "MASQUERADE", "MARK", "REJECT", "REDIRECT"})


@dataclass(frozen=True, slots=True)
class Opt:
    """One option of a match or target: `--name value`, `! --name value` when inverted."""

    name: str
    value: str = ""
    invert: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    """An `-m NAME` block with its options, in the order iptables-save prints them."""

    name: str
    opts: tuple[Opt, ...] = ()

    def get(self, name: str) -> Opt | None:
        for opt in self.opts:
            if opt.name == name:
                return opt
        return None


@dataclass(frozen=True, slots=True)
class Target:
    """`-j NAME` (or `-g NAME` when goto) with its options; NAME may be a user chain."""

    name: str
    opts: tuple[Opt, ...] = ()
    goto: bool = False

    def get(self, name: str) -> Opt | None:
        for opt in self.opts:
            if opt.name == name:
                return opt
        return None

    @property
    def is_jump(self) -> bool:
        """True when the target is a user-defined chain rather than a verdict or an extension."""
        return self.name not in STANDARD_TARGETS and self.name not in EXTENSION_TARGETS


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule. `src`/`dst` are CIDRs in canonical form; `target` None is a rule with no verdict
    (it only counts packets, as upstream's comment-only rules do)."""

    src: str | None = None
    src_invert: bool = False
    dst: str | None = None
    dst_invert: bool = False
    in_iface: str | None = None
    in_invert: bool = False
    out_iface: str | None = None
    out_invert: bool = False
    protocol: str | None = None
    protocol_invert: bool = False
    matches: tuple[Match, ...] = ()
    target: Target | None = None

    def match(self, name: str) -> Match | None:
        for m in self.matches:
            if m.name == name:
                return m
        return None

    @property
    def comment(self) -> str | None:
        m = self.match("comment")
        if m is None:
            return None
        opt = m.get("comment")
        return opt.value if opt else None


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class JumpRule:
    """A rule kproxy keeps at the top of a built-in chain (e.g. nat OUTPUT -> KUBE-SERVICES), or
    at its bottom when `append` (the userspace mode's NodePort jumps must come last).

    Built-in chains are shared with kubelet, the CNI and the administrator, so kproxy only ensures
    its own jump rules there and never rewrites the chain.
    """

    chain: str
    rule: Rule
    append: bool = False


@dataclass(frozen=True, slots=True)
class Table:
    """The kproxy-owned part of one netfilter table."""

    name: str
    chains: tuple[Chain, ...] = ()
    jumps: tuple[JumpRule, ...] = ()

    def chain(self, name: str) -> Chain | None:
        for c in self.chains:
            if c.name == name:
                return c
        return None


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Everything kproxy wants for one address family: `family` is 4 or 6."""

    family: int
    tables: tuple[Table, ...] = field(default_factory=tuple)

    def table(self, name: str) -> Table | None:
        for t in self.tables:
            if t.name == name:
                return t
        return None
