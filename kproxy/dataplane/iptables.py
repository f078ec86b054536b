"""The kernel backend: reads tables with iptables-legacy-save and writes them with python-iptables
(libiptc), one atomic commit per table, while holding the xtables lock.

Only chains whose rendered rules differ from the kernel's are rewritten; owned chains nobody wants
any more are deleted; jump rules in built-in chains are inserted once and never duplicated.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

from kproxy.dataplane.base import ApplyResult
from kproxy.dataplane.diff import (
    TableChanges,
    plan_cleanup,
    plan_table_changes,
    plan_table_changes_from,
)
from kproxy.dataplane.entries import EntryCompiler
from kproxy.dataplane.handles import Handles
from kproxy.dataplane.lock import xtables_lock
from kproxy.dataplane.tableinfo import table_info
from kproxy.errors import DataplaneError
from kproxy.rules.ir import Rule, Ruleset, Table
from kproxy.rules.saved import SavedTable, parse_save

TABLES = ("filter", "nat", "mangle")
_COMMIT_ATTEMPTS = 3  # the kernel refuses a replace when another writer changed the table meanwhile


def _save_command(family: int) -> str:
    return "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"


def read_tables(family: int = 4, tables: tuple[str, ...] = TABLES) -> dict[str, SavedTable]:
    """The current content of the given tables, as iptables-legacy-save prints it."""
    text = []
    for table in tables:
        try:
            proc = subprocess.run(
                [_save_command(family), "-t", table], capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            raise DataplaneError(
                f"{_save_command(family)} not found: install the iptables package"
            ) from None
        if proc.returncode != 0:
            raise DataplaneError(
                f"{_save_command(family)} -t {table} failed: {proc.stderr.strip()}"
            )
        text.append(proc.stdout)
    return parse_save("".join(text))


def load_iptc() -> ModuleType:
    if os.geteuid() != 0:
        raise DataplaneError("kproxy must run as root (CAP_NET_ADMIN) to program netfilter tables")
    os.environ.setdefault("XTABLES_LIBDIR", _xtables_libdir())
    try:
        import iptc
    except Exception as exc:  # python-iptables raises several kinds when libiptc is missing
        raise DataplaneError(
            f"cannot load python-iptables/libiptc ({exc}); "
            "install libip4tc2, libip6tc2 and iptables"
        ) from exc
    module: ModuleType = iptc
    return module


def _xtables_libdir() -> str:
    for candidate in (
        "/usr/lib/x86_64-linux-gnu/xtables",
        "/usr/lib/aarch64-linux-gnu/xtables",
        "/usr/lib/xtables",
        "/usr/lib64/xtables",
    ):
        if os.path.isdir(candidate):
            return candidate
    return ""


class IptablesDataplane:
    """Applies Rulesets of one address family to the kernel of the current network namespace.

    It remembers what it committed to each table and the table's fingerprint afterwards. While the
    fingerprint is unchanged a sync compares the new ruleset with that memory (a partial sync);
    otherwise, or when asked for a full sync, it reads the table back and compares with that, which
    also repairs whatever another program changed or flushed.
    """

    def __init__(self, family: int = 4, lock_timeout: float = 5.0) -> None:
        self.family = family
        self.lock_timeout = lock_timeout
        self._iptc = load_iptc()
        self._entries = EntryCompiler(self._build, family)
        self._handles = Handles(self._iptc, family)
        self._applied: dict[str, Table] = {}
        self._fingerprints: dict[str, tuple[int, int] | None] = {}

    def read(self) -> dict[str, SavedTable]:
        return read_tables(self.family)

    def apply(self, ruleset: Ruleset, full: bool = True) -> ApplyResult:
        """Make the kernel hold `ruleset`; each table is committed once, atomically."""
        result = ApplyResult()
        committed: list[str] = []
        with xtables_lock(self.lock_timeout):
            for desired in ruleset.tables:
                changes = self._commit_with_retry(
                    desired.name, partial(self._changes, desired, full=full)
                )
                self._applied[desired.name] = desired
                if not changes.empty:
                    committed.append(desired.name)
                result.tables.append(changes)
        self._handles.refresh_later(committed)
        return result

    def cleanup(self) -> ApplyResult:
        """Remove every kproxy/kube-proxy chain and jump rule, nothing else."""
        result = ApplyResult()
        with xtables_lock(self.lock_timeout):
            for name in TABLES:
                self._applied.pop(name, None)
                result.tables.append(self._commit_with_retry(name, partial(self._cleanup, name)))
        return result

    def _cleanup(self, name: str, current: SavedTable | None) -> TableChanges:
        return plan_cleanup(self._read(name, current))

    def _read(self, name: str, current: SavedTable | None) -> SavedTable:
        return (
            current
            if current is not None
            else read_tables(self.family, (name,)).get(name, SavedTable(name))
        )

    def _changes(
        self, desired: Table, current: SavedTable | None, *, full: bool = True
    ) -> TableChanges:
        """From memory when nothing else touched the table since our commit, else from the
        kernel (`current` is None until read)."""
        applied = self._applied.get(desired.name)
        if current is None and not full and applied is not None:
            changes = plan_table_changes_from(desired, applied)
            if changes is not None:
                return changes
        return plan_table_changes(desired, self._read(desired.name, current))

    def _commit_with_retry(
        self, table: str, plan: Callable[[SavedTable | None], TableChanges]
    ) -> TableChanges:
        for attempt in range(_COMMIT_ATTEMPTS):
            fingerprint = table_info(self.family, table)
            trusted = fingerprint is not None and fingerprint == self._fingerprints.get(table)
            changes = plan(None if trusted else self._read(table, None))
            if changes.empty:
                return changes
            try:
                self._write(changes, fingerprint)
                self._fingerprints[table] = table_info(self.family, table)
                return changes
            except self._iptc.XTablesError as exc:
                self._forget(table)
                # Nothing was committed: the handle holding the partial edit is discarded.
                raise DataplaneError(
                    f"python-iptables could not build a rule for table {table} ({exc}); are the "
                    "iptables extensions installed in XTABLES_LIBDIR "
                    f"({os.environ.get('XTABLES_LIBDIR') or 'unset'})?"
                ) from exc
            except self._iptc.IPTCError as exc:
                self._forget(table)
                if (
                    "Resource temporarily unavailable" in str(exc)
                    and attempt + 1 < _COMMIT_ATTEMPTS
                ):
                    continue  # another writer committed between our read and our commit
                raise DataplaneError(f"writing table {table} failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _forget(self, table: str) -> None:
        """After a failure nothing about the table is trusted: the next sync reads it."""
        self._fingerprints.pop(table, None)
        self._applied.pop(table, None)
        self._handles.forget(table)

    def _write(self, changes: TableChanges, fingerprint: tuple[int, int] | None) -> None:
        iptc = self._iptc
        table = self._handles.acquire(changes.table, fingerprint)
        for chain, positions in changes.remove_jumps.items():
            for pos in sorted(positions, reverse=True):
                if table._iptc.iptc_delete_num_entry(chain.encode(), pos, table._handle) != 1:
                    raise iptc.IPTCError(f"can't delete rule {pos} of {chain}: {table.strerror()}")
        created = set(changes.create)
        for name in changes.create:
            table.create_chain(name)
        lib, handle = table._iptc, table._handle
        for wanted in changes.write:
            if wanted.name not in created:
                table.flush_entries(wanted.name)
            chain_name = wanted.name.encode()
            for rule in wanted.rules:
                # libiptc directly: python-iptables' append_entry makes a ctypes cast per call,
                # a reference cycle only the cyclic collector frees.
                if lib.iptc_append_entry(chain_name, self._entries.entry(rule), handle) != 1:
                    raise iptc.IPTCError(f"can't append to chain {wanted.name}: {table.strerror()}")
        for name in changes.delete:
            table.flush_entries(name)
        for name in changes.delete:
            table.delete_chain(name)
        for jump in changes.insert_jumps:
            entry = self._entries.entry(jump.rule)
            if lib.iptc_insert_entry(jump.chain.encode(), entry, 0, handle) != 1:
                raise iptc.IPTCError(f"can't insert into chain {jump.chain}: {table.strerror()}")
        table.commit()

    def _build(self, rule: Rule) -> Any:
        """A python-iptables Rule from the IR."""
        iptc = self._iptc
        r = iptc.Rule() if self.family == 4 else iptc.Rule6()
        if rule.src is not None:
            r.src = ("!" if rule.src_invert else "") + rule.src
        if rule.dst is not None:
            r.dst = ("!" if rule.dst_invert else "") + rule.dst
        if rule.in_iface is not None:
            r.in_interface = ("!" if rule.in_invert else "") + rule.in_iface
        if rule.out_iface is not None:
            r.out_interface = ("!" if rule.out_invert else "") + rule.out_iface
        if rule.protocol is not None:
            r.protocol = ("!" if rule.protocol_invert else "") + rule.protocol
        for match in rule.matches:
            m = r.create_match(match.name)
            for opt in match.opts:
                m.set_parameter(opt.name, ("!" if opt.invert else "") + opt.value)
        if rule.target is None:
            r.create_target("")  # the empty standard target: count and fall through
        else:
            t = r.create_target(rule.target.name, goto=rule.target.goto)
            for opt in rule.target.opts:
                t.set_parameter(opt.name, ("!" if opt.invert else "") + opt.value)
        return r
