"""What every dataplane offers the sync loop, and what one apply reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from kproxy.plan.node_plan import NodePlan
from kproxy.rules.ir import Ruleset
from kproxy.rules.saved import SavedTable


class TableReport(Protocol):
    """What one table's apply did (iptables: TableChanges; nftables: NftTableChanges)."""

    @property
    def table(self) -> str: ...
    @property
    def write(self) -> Sequence[object]: ...
    @property
    def delete(self) -> Sequence[str]: ...
    @property
    def remove_jumps(self) -> Mapping[str, list[int]]: ...
    @property
    def unchanged(self) -> int: ...
    @property
    def read_kernel(self) -> bool: ...
    @property
    def rules_written(self) -> int: ...
    @property
    def empty(self) -> bool: ...


@dataclass
class ApplyResult:
    """What one apply did, summed over its tables."""

    tables: list[TableReport] = field(default_factory=list)
    # The other modes' chains and tables removed after this mode's commit (leftovers.py): they
    # count in what was removed and changed, never in what this mode wrote or has.
    leftovers: list[TableReport] = field(default_factory=list)
    # Cleanups beside the sync's own commit that failed and are retried by the next sync (the
    # other modes' leftovers); the sync itself succeeded.
    cleanup_failures: int = 0

    @property
    def chains_written(self) -> int:
        return sum(len(t.write) for t in self.tables)

    @property
    def rules_written(self) -> int:
        return sum(t.rules_written for t in self.tables)

    @property
    def chains_removed(self) -> int:
        """This mode's removed chains and the other modes' (a switch's leftovers)."""
        return sum(len(t.delete) for t in (*self.tables, *self.leftovers))

    @property
    def leftover_chains_removed(self) -> int:
        return sum(len(t.delete) for t in self.leftovers)

    @property
    def chains_unchanged(self) -> int:
        return sum(t.unchanged for t in self.tables)

    @property
    def read_kernel(self) -> bool:
        return any(t.read_kernel for t in self.tables)

    @property
    def changed(self) -> bool:
        return any(not t.empty for t in (*self.tables, *self.leftovers))


@dataclass(frozen=True, slots=True)
class ChainDiff:
    """What the next sync would change in one chain (or, for a mode that writes objects rather
    than chains, one object): `kproxy dump --diff` prints `lines`."""

    family: int
    table: str
    chain: str
    change: str  # "added", "removed" or "rewritten"
    lines: tuple[str, ...]  # a unified diff, `---`/`+++` headers first


@dataclass(frozen=True, slots=True)
class NodeNeeds:
    """What a mode's dataplane needs of the node, as `kproxy doctor` judges it: which netfilter
    backend its rules go into (the legacy x_tables; x_tables in the backend kubelet uses, legacy
    or iptables-nft; or nf_tables of its own) and the oldest kernel (major, minor) that carries
    them out."""

    tables: Literal["legacy", "xtables", "nftables"]
    min_kernel: tuple[int, int] = (0, 0)


class ModeDataplane(Protocol):
    """A proxy mode's dataplane for the whole node: it carries out that mode's NodePlan."""

    @property
    def families(self) -> tuple[int, ...]: ...

    def reading_ahead(self) -> AbstractContextManager[None]: ...

    def apply(self, plan: NodePlan[Any], full: bool) -> ApplyResult:
        """Make the node hold `plan`. A full apply compares with what the kernel holds; a
        partial one may start from what this dataplane applied last."""
        ...

    def cleanup(self) -> ApplyResult: ...

    def problems(self) -> list[str]:
        """What health must report: a part of the data path that stopped working."""
        ...


@runtime_checkable
class RelayStats(Protocol):
    """A dataplane that relays connections itself (the userspace mode) and counts them."""

    def service_port_counters(self) -> dict[str, dict[str, int]]:
        """Per service port (its name as kube-proxy prints it), the relay's counters."""
        ...


class Dataplane(Protocol):
    """The kernel side of a sync: the python-iptables backend, or a fake in unit tests."""

    def read(self) -> dict[str, SavedTable]: ...

    def apply(self, ruleset: Ruleset, full: bool = True) -> ApplyResult:
        """Make the kernel hold `ruleset`. A full apply compares with the kernel's rules; a
        partial one may compare with what this dataplane committed last."""
        ...

    def cleanup(self) -> ApplyResult: ...

    def reading_ahead(self) -> AbstractContextManager[None]:
        """Around a partial sync's plan and apply: start the kernel reads the apply will need
        while the plan is made (a dataplane with nothing to read ahead does nothing)."""
        ...
