"""The iptables mode's nft backend: the same rule IR, written into the `ip`/`ip6` `nat` and
`filter` tables in the form iptables-nft writes, by `iptables-nft-restore --noflush` (upstream's
road), read back with `iptables-nft-save -t TABLE`, so the node's own `iptables-save` shows
kproxy's chains and round-trips them.

Each table is one transaction that names only what changes (see nft_restore.py): nf_tables can
flush one chain, so a one-service change writes that service's chains, never the table. Another
writer's transaction between kproxy's read and its commit cannot be lost: kproxy never replaces a
table, and iptables-nft-restore re-reads and retries when the kernel's ruleset generation moved
under it.

No-change syncs cost one netlink round trip: the kernel's ruleset generation (nft_generation.py)
is kept with what kproxy committed; while it has not moved, nothing was written by anybody, so the
kept table is what the kernel holds and the change is planned from it. When it moved (kubelet, a
CNI, an administrator's flush), the table is read and compared afresh, which also repairs a
flushed or deleted chain.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import compress, count, islice
from operator import is_not

from kproxy.dataplane.base import ApplyResult
from kproxy.dataplane.xtables.detect import save_command
from kproxy.dataplane.xtables.diff import (
    TableChanges,
    plan_cleanup,
    plan_table_changes,
    plan_table_changes_from,
)
from kproxy.dataplane.xtables.nft_generation import read_generation, table_exists
from kproxy.dataplane.xtables.nft_restore import render_restore
from kproxy.errors import DataplaneError
from kproxy.rules.ir import Chain, Ruleset, Table
from kproxy.rules.saved import SavedTable, parse_save

TABLES = ("filter", "nat", "mangle")
_Planner = Callable[[SavedTable], TableChanges]
_ATTEMPTS = 3


def _run(argv: list[str], text: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=text, capture_output=True, text=True, errors="replace", check=False
        )
    except FileNotFoundError:
        raise DataplaneError(f"{argv[0]} not found: install the iptables package") from None


def read_nft_tables(family: int = 4, tables: tuple[str, ...] = TABLES) -> dict[str, SavedTable]:
    """The tables as iptables-nft-save prints them (a table nobody created reads empty; nothing
    is created by reading)."""
    command = save_command("nft", family)
    text = []
    for table in tables:
        proc = _run([command, "-t", table])
        if proc.returncode != 0:
            raise DataplaneError(f"{command} -t {table} failed: {proc.stderr.strip()}")
        text.append(proc.stdout)
    return parse_save("".join(text))


def changes_from(desired: Table, applied: Table) -> TableChanges | None:
    """plan_table_changes_from, comparing only what lies between the chains that are equal at
    the start and at the end of both tables: the planner hands unchanged ports' chains over as
    the very objects it planned last time, so after a one-service change that is its few chains,
    not the 60,000 of 10,000 services. Same result (chain names are unique in a table)."""
    if desired is applied or desired.jumps != applied.jumps:
        return plan_table_changes_from(desired, applied)
    new, old = desired.chains, applied.chains
    head = _equal_run(new, old, min(len(new), len(old)))
    tail = _equal_run(new[::-1], old[::-1], min(len(new), len(old)) - head)
    changes = plan_table_changes_from(
        replace(desired, chains=new[head : len(new) - tail]),
        replace(applied, chains=old[head : len(old) - tail]),
    )
    if changes is not None:
        changes.unchanged += head + tail
    return changes


def _equal_run(new: tuple[Chain, ...], old: tuple[Chain, ...], limit: int) -> int:
    """How many chains, from the start, are equal in both (at most `limit`): identical objects
    are skipped at C speed, the rest compared."""
    i = 0
    while i < limit:
        differ = map(is_not, islice(new, i, limit), islice(old, i, limit))
        i = next(compress(count(i), differ), limit)
        if i == limit or new[i] != old[i]:
            return i
        i += 1
    return i


@dataclass(frozen=True, slots=True)
class _Kept:
    """While the ruleset generation is `generation`, the kernel holds `applied` of kproxy's."""

    applied: Table
    generation: int


class _Refused(Exception):
    """The restore failed (e.g. a jump rule to remove was gone): plan again from the kernel."""


class KeptTables:
    """What kproxy committed last, per (family, table), shared by a node's family dataplanes:
    each commit moves the one generation of the namespace, so after one of kproxy's own commits
    (and nobody else's) every other kept table is still what the kernel holds."""

    def __init__(self) -> None:
        self._kept: dict[tuple[int, str], _Kept] = {}

    def get(self, family: int, table: str) -> _Kept | None:
        return self._kept.get((family, table))

    def forget(self, family: int, table: str) -> None:
        self._kept.pop((family, table), None)

    def keep(self, family: int, table: str, applied: Table, generation: int) -> None:
        self._kept[(family, table)] = _Kept(applied, generation)

    def committed(self, before: int, after: int) -> None:
        """kproxy's own commit moved the generation from `before` to `after`, nobody else's."""
        for key, kept in self._kept.items():
            if kept.generation == before:
                self._kept[key] = _Kept(kept.applied, after)


class NftDataplane:
    """Applies one family's Rulesets through iptables-nft-restore (the Dataplane protocol)."""

    def __init__(
        self, family: int = 4, lock_timeout: float = 5.0, kept: KeptTables | None = None
    ) -> None:
        if os.geteuid() != 0:
            raise DataplaneError(
                "kproxy must run as root (CAP_NET_ADMIN) to program netfilter tables"
            )
        self.family = family
        self.lock_timeout = lock_timeout  # iptables-nft takes no lock: transactions serialise
        self._kept = kept if kept is not None else KeptTables()

    def read(self) -> dict[str, SavedTable]:
        return read_nft_tables(self.family)

    def close(self) -> None:
        return None

    @contextmanager
    def reading_ahead(self) -> Iterator[None]:
        yield

    def apply(self, ruleset: Ruleset, full: bool = True) -> ApplyResult:
        result = ApplyResult()
        for desired in ruleset.tables:
            result.tables.append(self._sync_table(desired, full))
        return result

    def cleanup(self) -> ApplyResult:
        """Remove every kproxy/kube-proxy chain and jump rule of this family's iptables-nft
        tables, nothing else."""
        result = ApplyResult()
        for name in TABLES:
            self._kept.forget(self.family, name)
            if table_exists(self.family, name) is False:  # nothing there, and no dump to read
                result.tables.append(TableChanges(name))
            else:
                result.tables.append(self._from_kernel(name, plan_cleanup, keep=None))
        return result

    def _sync_table(self, desired: Table, full: bool) -> TableChanges:
        kept = None if full else self._kept.get(self.family, desired.name)
        if kept is not None and read_generation() == kept.generation:
            changes = changes_from(desired, kept.applied)
            if changes is not None:
                if changes.empty:
                    return changes
                try:
                    self._restore(changes, None, desired, kept.generation)
                    return changes
                except _Refused:
                    pass
        return self._from_kernel(
            desired.name, lambda saved: plan_table_changes(desired, saved), keep=desired
        )

    def _from_kernel(self, name: str, plan: _Planner, keep: Table | None) -> TableChanges:
        """Read the table, plan, and restore; retried when the restore is refused."""
        self._kept.forget(self.family, name)
        for attempt in range(_ATTEMPTS):
            before = read_generation()
            saved = read_nft_tables(self.family, (name,)).get(name, SavedTable(name))
            seen = read_generation() if before is not None else None
            changes = plan(saved)
            read_whole = before is not None and before == seen
            if changes.empty:
                if keep is not None and read_whole and before is not None:
                    self._kept.keep(self.family, name, keep, before)
                return changes
            try:
                self._restore(changes, saved, keep, seen if read_whole else None)
                return changes
            except _Refused as exc:
                if attempt + 1 == _ATTEMPTS:
                    raise DataplaneError(
                        f"{save_command('nft', self.family, restore=True)} refused table {name} "
                        f"{_ATTEMPTS} times: {exc}"
                    ) from None
        raise AssertionError("unreachable")

    def _restore(
        self,
        changes: TableChanges,
        saved: SavedTable | None,
        applied: Table | None,
        generation: int | None,
    ) -> None:
        """One transaction; `applied` is kept when the generation moved by exactly this commit
        from `generation` (the one the plan was based on), i.e. nobody wrote in between."""
        command = save_command("nft", self.family, restore=True)
        text = render_restore(changes, saved)
        before = read_generation()
        proc = _run([command, "--noflush"], text)
        if proc.returncode != 0:
            raise _Refused(proc.stderr.strip() or f"exit status {proc.returncode}")
        after = read_generation()
        self._kept.forget(self.family, changes.table)
        if before is None or after != before + 1:
            return  # another program committed too: every kept table is read next time
        self._kept.committed(before, after)
        if applied is not None and generation == before:
            self._kept.keep(self.family, changes.table, applied, after)
