"""The nftables mode's dataplane for a whole node: both families' `kube-proxy` tables in ONE
netlink batch transaction per sync, carrying only what changed since kproxy's last commit.

Foreign changes: nf_tables keeps one generation counter for the whole ruleset. kproxy reads it
before each sync; if it moved since kproxy's own commit, some program committed something. Then
kproxy asks its monitor (a socket on nf_tables' change notifications, opened after its first
commit) whose tables that commit touched: a firewall's commit to a table of its own costs kproxy
nothing. If it touched kproxy's table, or the monitor cannot tell (notifications were lost),
kproxy re-reads its own table (and only that table) and repairs it in the same transaction.
No other table is ever dumped or written; of another program's notifications kproxy looks only
at the table each one names."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field

import structlog

from kproxy.dataplane.base import ApplyResult, ModeDataplane
from kproxy.dataplane.host import kernel_version, node_families
from kproxy.dataplane.localhost_nodeports import WithLocalhostNodePorts, open_localhost_node_ports
from kproxy.dataplane.nftables.delta import (
    NFT_MSG_DELTABLE,
    TableDelta,
    TableImage,
    delta_messages,
    diff_changes,
    diff_tables,
    full_delta,
)
from kproxy.dataplane.nftables.encode import table_name_attrs
from kproxy.dataplane.nftables.families import NFPROTO, NFT_FAMILY_NAMES
from kproxy.dataplane.nftables.kernel import (
    NFT_MSG_GETCHAIN,
    definitions_match,
    diff_kernel,
    read_generation,
    read_kernel_table,
    table_exists,
)
from kproxy.dataplane.nftables.needs import MIN_KERNEL
from kproxy.dataplane.nftables.netlink import NftMonitor, NftNetlink, iter_attrs
from kproxy.dataplane.nftables.staged import StageRefused, split_fresh, write_unhooked
from kproxy.errors import DataplaneError
from kproxy.model.config import ProxyConfig
from kproxy.plan.localhost_nodeports import serves_localhost
from kproxy.plan.nftables import naming
from kproxy.plan.nftables.ir import NftTable, TableChanges
from kproxy.plan.node_plan import NodePlan

log = structlog.get_logger("kproxy.dataplane")


class KernelTooOldError(DataplaneError):
    """The kernel lacks what the nftables mode relies on (as upstream checks it)."""


def check_kernel(release: str | None = None) -> None:
    """Refuse kernels older than 5.13, as upstream's nftables mode does."""
    release = release or os.uname().release
    if kernel_version(release) < MIN_KERNEL:
        raise KernelTooOldError(
            f"the nftables proxy mode needs kernel >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]}, this node"
            f" runs {release}: use `mode: iptables` on this node"
        )


@dataclass
class NftTableChanges:
    """One family's table in an ApplyResult (the shape the sync loop and `sync --once` read)."""

    table: str
    write: list[str] = field(default_factory=list)  # chains added or rewritten
    delete: list[str] = field(default_factory=list)
    unchanged: int = 0
    read_kernel: bool = False
    rules_written: int = 0
    elements_changed: int = 0
    remove_jumps: dict[str, list[int]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.write or self.delete or self.elements_changed)

    @classmethod
    def of(cls, delta: TableDelta) -> NftTableChanges:
        written = [*delta.add_chains, *delta.rewrite_chains]
        return cls(
            table=f"{NFT_FAMILY_NAMES[delta.family]} {delta.table}",
            write=[c.name for c in written],
            delete=list(delta.delete_chains),
            unchanged=delta.unchanged_chains,
            read_kernel=delta.read_kernel,
            rules_written=sum(len(c.rules) for c in written),
            elements_changed=sum(len(v) for v in delta.add_elements.values())
            + sum(len(v) for v in delta.delete_elements.values())
            + (1 if delta.recreate or delta.add_sets or delta.delete_sets else 0),
        )


class NftablesNode:
    def __init__(self, nl: NftNetlink, families: tuple[int, ...]) -> None:
        self.nl = nl
        self._families = families
        self._images: dict[int, TableImage] = {}
        self._applied: dict[int, NftTable] = {}  # the planned tables last committed
        self._generation: int | None = None  # what kproxy's last commit left, if known
        self._monitor: NftMonitor | None = None

    @property
    def families(self) -> tuple[int, ...]:
        return self._families

    def reading_ahead(self) -> AbstractContextManager[None]:
        return nullcontext()

    def apply(self, plan: NodePlan[Mapping[int, NftTable]], full: bool) -> ApplyResult:
        before = read_generation(self.nl)
        moved = self._generation is None or before != self._generation
        if moved and self._generation is not None and self._untouched_by_others():
            moved = False  # other programs committed, but none of it to kproxy's tables
        # Tables patched from the ones last committed, whose images can be patched alike.
        patched = {
            family: changes
            for family, table in plan.kernel.items()
            if not (full or moved) and (changes := self._changes_since_applied(table)) is not None
        }
        deltas = [
            self._delta(table, full or moved, patched.get(family))
            for family, table in sorted(plan.kernel.items())
        ]
        set_ids = iter(range(1, 1 << 31))
        parts = [split_fresh(d) if d.fresh else (None, d) for d in deltas]
        unhooked = [u for u, _ in parts if u is not None]
        commits = 0
        try:
            if unhooked:
                commits = write_unhooked(self.nl, unhooked, set_ids)
            messages = (m for _, d in parts for m in delta_messages(d, set_ids))
            commits += self.nl.transact(messages)
        except OSError as exc:
            if (exc.committed if isinstance(exc, StageRefused) else commits) > 0:
                for delta in unhooked:  # created by a stage, never hooked: nothing reached them
                    with suppress(OSError):
                        delete_table(self.nl, delta.family, delta.table)
            self._images.clear()  # unknown state: the next sync reads the kernel
            self._applied.clear()
            self._generation = None
            raise DataplaneError(f"nftables transaction refused: {exc}") from exc
        self._listen()  # from here on, another program's change is seen by the monitor
        after = read_generation(self.nl)
        # Only our own commits in between: the generation moved by exactly as many.
        ours = after == before + commits
        self._generation = after if ours else None
        for family, table in plan.kernel.items():
            if self._applied.get(family) is not table:
                changes = patched.get(family)
                if changes is not None:
                    self._images[family].patch(table, changes)
                else:
                    self._images[family] = TableImage.of(table)
                self._applied[family] = table
        return ApplyResult(tables=[NftTableChanges.of(d) for d in deltas])

    def _changes_since_applied(self, table: NftTable) -> TableChanges | None:
        """What the planner says changed, when it patched the table last committed."""
        applied, changes = self._applied.get(table.family), table.changes
        if applied is None or changes is None or table.family not in self._images:
            return None
        return changes if changes.base() is applied else None

    def _untouched_by_others(self) -> bool:
        """Whether the notifications since kproxy's last commit show another program changing
        other tables only (False when they cannot tell: none kept, or some lost)."""
        if self._monitor is None:
            return False
        try:
            changed = self._monitor.changed_tables(self.nl.port)
        except OSError:
            return False
        mine = {(NFPROTO[family], naming.TABLE) for family in self._families}
        return changed is not None and not changed & mine

    def _listen(self) -> None:
        """Open the monitor after kproxy's first commit (so that a cold start's own
        notifications are never built), and later forget what it heard of kproxy's own."""
        if self._monitor is None:
            self._monitor = NftMonitor()
        else:
            with suppress(OSError):
                self._monitor.changed_tables(self.nl.port)

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    def _delta(
        self, table: NftTable, read_kernel: bool, changes: TableChanges | None
    ) -> TableDelta:
        image = self._images.get(table.family)
        if image is not None and not read_kernel:
            if self._applied.get(table.family) is table:  # the loop's plan of no change
                return TableDelta(table.family, table.name, unchanged_chains=len(image.chains))
            if changes is not None:
                return diff_changes(table, image, changes)
            return diff_tables(table, image)
        # A full sync, another program's commit since kproxy's, or kproxy's first in this
        # process (a restart keeps the table, and the affinity sets, when they are right).
        dynamic = frozenset(s.name for s in table.sets if s.dynamic)
        kernel = read_kernel_table(self.nl, table.family, table.name, dynamic, table)
        name = f"{table.nft_family} {table.name}"
        if kernel is None or not definitions_match(table, kernel):
            if image is not None:
                log.warning("table_recreated", table=name)
            delta = full_delta(table)
            delta.read_kernel = True
            delta.fresh = kernel is None
            return delta
        delta = diff_kernel(table, kernel)
        if image is not None and not delta.empty:
            log.warning(
                "table_repaired",
                table=name,
                chains=len(delta.add_chains) + len(delta.rewrite_chains) + len(delta.delete_chains),
            )
        return delta

    def problems(self) -> list[str]:
        return []  # the kernel's table is the data path: nothing of ours runs to fail

    def cleanup(self) -> ApplyResult:
        """Delete both families' `kube-proxy` tables (kproxy's, or upstream's leftovers)."""
        result = ApplyResult()
        for family in (4, 6):
            if delete_table(self.nl, family):
                result.tables.append(
                    NftTableChanges(f"{NFT_FAMILY_NAMES[family]} {naming.TABLE}", delete=["*"])
                )
        self._images.clear()
        self._applied.clear()
        self._generation = None
        return result


def delete_table(nl: NftNetlink, family: int, name: str = naming.TABLE) -> bool:
    """Delete one table if it exists; True when it did."""
    if not table_exists(nl, family, name):
        return False
    nl.transact([(NFT_MSG_DELTABLE, 0, NFPROTO[family], table_name_attrs(name))])
    return True


def chain_names(nl: NftNetlink, family: int, name: str) -> list[str]:
    """The chains of one table (the dump is filtered to it: the kernel answers with every
    table's)."""
    request = table_name_attrs(name)
    return [
        attrs[3].rstrip(b"\0").decode("utf-8", "surrogateescape")
        for msg in nl.dump(NFT_MSG_GETCHAIN, NFPROTO[family], request)
        for attrs in (dict(iter_attrs(msg.attrs)),)
        if 3 in attrs
    ]


def remove_nftables_mode(
    open_netlink: Callable[[], NftNetlink] = NftNetlink,
) -> list[NftTableChanges]:
    """Delete both families' `kube-proxy` tables (when another mode took over, or for
    `cleanup`): per table deleted, its chains."""
    removed = []
    with open_netlink() as nl:
        for family in (4, 6):
            if table_exists(nl, family, naming.TABLE):
                chains = chain_names(nl, family, naming.TABLE)
                delete_table(nl, family)
                table = f"{NFT_FAMILY_NAMES[family]} {naming.TABLE}"
                removed.append(NftTableChanges(table, delete=chains))
    return removed


@contextmanager
def open_nftables_node(families: tuple[int, ...]) -> Iterator[NftablesNode]:
    check_kernel()
    with NftNetlink() as nl:
        node = NftablesNode(nl, families)
        try:
            yield node
        finally:
            node.close()


@contextmanager
def open_nftables_mode(config: ProxyConfig | None = None) -> Iterator[ModeDataplane]:
    """The mode on this node: both families when the namespace has IPv6; with the
    KubeProxyNFTablesLocalhostNodePorts gate, composed with the relay's listeners on 127.0.0.1
    and ::1 (none run without it, as upstream)."""
    families = node_families()
    with open_nftables_node(families) as node:
        served = tuple(f for f in families if config and serves_localhost(config, f))
        if not served:
            yield node
            return
        with open_localhost_node_ports(served) as localhost:
            yield WithLocalhostNodePorts(node, localhost)
