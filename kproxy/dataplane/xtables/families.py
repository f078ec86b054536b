"""The x_tables dataplanes of a node, one per address family it has: opened together, applied
and cleaned together, and the removal of every kube-proxy chain they hold (what the iptables
and userspace modes leave on a node that another mode has taken over)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import structlog

from kproxy.dataplane.base import ApplyResult, Dataplane, TableReport
from kproxy.dataplane.host import ipv6_supported
from kproxy.dataplane.xtables.backend import IptablesDataplane
from kproxy.dataplane.xtables.family_process import FamilyProcess
from kproxy.rules.ir import Ruleset

log = structlog.get_logger("kproxy.dataplane")

# The kernel lists the legacy tables in use here (it creates a table on its first use).
LEGACY_TABLE_LISTS = (Path("/proc/net/ip_tables_names"), Path("/proc/net/ip6_tables_names"))


class FamilyTables:
    """Per family, the dataplane holding that family's x_tables."""

    def __init__(self, dataplanes: Mapping[int, Dataplane]) -> None:
        self.dataplanes = dataplanes

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(sorted(self.dataplanes))

    @contextmanager
    def reading_ahead(self) -> Iterator[None]:
        with ExitStack() as stack:
            for dataplane in self.dataplanes.values():
                stack.enter_context(dataplane.reading_ahead())
            yield

    def apply(self, rulesets: Mapping[int, Ruleset], full: bool) -> ApplyResult:
        result = ApplyResult()
        for family, ruleset in sorted(rulesets.items()):
            result.tables.extend(self.dataplanes[family].apply(ruleset, full).tables)
        return result

    def cleanup(self) -> ApplyResult:
        result = ApplyResult()
        for dataplane in self.dataplanes.values():
            result.tables.extend(dataplane.cleanup().tables)
        return result


@contextmanager
def open_dataplanes(
    lock_timeout: float, keep_copies: bool = True
) -> Iterator[dict[int, Dataplane]]:
    """IPv4 in this process; IPv6, when the namespace has it, in a process of its own (see
    family_process.py for why one process cannot hold both). `keep_copies`: see
    IptablesDataplane (False: the process syncs once)."""
    v4 = IptablesDataplane(4, lock_timeout, keep_copies)
    dataplanes: dict[int, Dataplane] = {4: v4}
    v6 = None
    if ipv6_supported():  # the process starts in the background
        v6 = FamilyProcess(6, lock_timeout, keep_copies)
    if v6 is not None:
        dataplanes[6] = v6
    try:
        yield dataplanes
    finally:
        v4.close()
        if v6 is not None:
            v6.close()


def legacy_tables_in_use() -> bool:
    """Whether this namespace has any legacy x_tables table: without one there is no chain to
    remove (and loading libiptc, about a second, is saved)."""
    for path in LEGACY_TABLE_LISTS:
        try:
            if path.read_text().strip():
                return True
        except OSError:
            continue
    return False


def remove_xtables_chains(lock_timeout: float) -> list[TableReport]:
    """Delete the iptables and userspace modes' chains (kproxy's or kube-proxy's) and the jumps
    to them, both families: per table, what was removed."""
    if not legacy_tables_in_use():
        return []
    with open_dataplanes(lock_timeout) as dataplanes:
        removed = FamilyTables(dataplanes).cleanup().tables
    chains = sum(len(t.delete) for t in removed)
    if chains:
        log.info("xtables_chains_removed", chains=chains)
    return removed
