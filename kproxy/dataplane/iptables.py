"""The kernel backend: reads tables with iptables-legacy-save and writes them with python-iptables
(libiptc), one atomic commit per table, while holding the xtables lock.

Only chains whose rendered rules differ from the kernel's are rewritten; owned chains nobody wants
any more are deleted; jump rules in built-in chains are inserted once and never duplicated.
"""

from __future__ import annotations

import os
import subprocess
from types import ModuleType
from typing import Any

from kproxy.dataplane.base import ApplyResult as ApplyResult
from kproxy.dataplane.diff import TableChanges, plan_cleanup, plan_table_changes
from kproxy.dataplane.entries import EntryCompiler
from kproxy.dataplane.lock import xtables_lock
from kproxy.errors import DataplaneError
from kproxy.rules.ir import Rule, Ruleset
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


def _load_iptc() -> ModuleType:
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
    """Applies Rulesets of one address family to the kernel of the current network namespace."""

    def __init__(self, family: int = 4, lock_timeout: float = 5.0) -> None:
        self.family = family
        self.lock_timeout = lock_timeout
        self._iptc = _load_iptc()
        self._entries = EntryCompiler(self._build, family)

    def read(self) -> dict[str, SavedTable]:
        return read_tables(self.family)

    def apply(self, ruleset: Ruleset) -> ApplyResult:
        """Make the kernel hold `ruleset`; each table is committed once, atomically."""
        result = ApplyResult()
        with xtables_lock(self.lock_timeout):
            for desired in ruleset.tables:
                result.tables.append(
                    self._commit_with_retry(
                        desired.name,
                        lambda current, d=desired: plan_table_changes(d, current),
                    )
                )
        return result

    def cleanup(self) -> ApplyResult:
        """Remove every kproxy/kube-proxy chain and jump rule, nothing else."""
        result = ApplyResult()
        with xtables_lock(self.lock_timeout):
            for name in TABLES:
                result.tables.append(
                    self._commit_with_retry(
                        name,
                        lambda current, n=name: plan_cleanup(current or SavedTable(n)),
                    )
                )
        return result

    def _commit_with_retry(self, table: str, plan: Any) -> TableChanges:
        for attempt in range(_COMMIT_ATTEMPTS):
            current = read_tables(self.family, (table,)).get(table)
            changes: TableChanges = plan(current)
            if changes.empty:
                return changes
            try:
                self._write(changes)
                return changes
            except self._iptc.XTablesError as exc:
                # Nothing was committed: the handle holding the partial edit is discarded.
                raise DataplaneError(
                    f"python-iptables could not build a rule for table {table} ({exc}); are the "
                    "iptables extensions installed in XTABLES_LIBDIR "
                    f"({os.environ.get('XTABLES_LIBDIR') or 'unset'})?"
                ) from exc
            except self._iptc.IPTCError as exc:
                if (
                    "Resource temporarily unavailable" in str(exc)
                    and attempt + 1 < _COMMIT_ATTEMPTS
                ):
                    continue  # another writer committed between our read and our commit
                raise DataplaneError(f"writing table {table} failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _write(self, changes: TableChanges) -> None:
        iptc = self._iptc
        table_cls = iptc.Table if self.family == 4 else iptc.Table6
        table = table_cls(changes.table, autocommit=False)
        table.refresh()  # drops anything a failed earlier attempt left in the handle
        for chain, positions in changes.remove_jumps.items():
            for pos in sorted(positions, reverse=True):
                if table._iptc.iptc_delete_num_entry(chain.encode(), pos, table._handle) != 1:
                    raise iptc.IPTCError(f"can't delete rule {pos} of {chain}: {table.strerror()}")
        for name in changes.create:
            table.create_chain(name)
        for wanted in changes.write:
            if wanted.name not in changes.create:
                table.flush_entries(wanted.name)
            for rule in wanted.rules:
                table.append_entry(wanted.name, self._entries.entry(rule))
        for name in changes.delete:
            table.flush_entries(name)
        for name in changes.delete:
            table.delete_chain(name)
        for jump in changes.insert_jumps:
            table.insert_entry(jump.chain, self._entries.entry(jump.rule), 0)
        table.commit()
        table.refresh()

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
