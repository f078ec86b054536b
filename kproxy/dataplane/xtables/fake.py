"""An in-memory dataplane for unit tests: the same surface as IptablesDataplane, the same diff
(plan_table_changes / plan_cleanup), and the same refusals as the kernel and libiptc.

Refused, with DataplaneError and the table left as it was (each table commits atomically, as a
libiptc commit does): a rule whose target is neither a chain of its table nor a known target
extension; a jump to a built-in chain; a loop of jumps; creating a chain that exists, a chain whose
name is longer than 28 characters or a built-in one; deleting a chain some rule still jumps to, a
missing chain or a built-in one; a target the kernel restricts to other tables or hooks (DNAT
outside nat PREROUTING/OUTPUT, MASQUERADE outside POSTROUTING, REJECT outside filter
INPUT/FORWARD/OUTPUT, judged by which built-in chains reach the rule, as the kernel does).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache

from kproxy.dataplane.base import ApplyResult
from kproxy.dataplane.xtables.backend import TABLES
from kproxy.dataplane.xtables.diff import (
    TableChanges,
    plan_cleanup,
    plan_table_changes,
    plan_table_changes_from,
)
from kproxy.errors import DataplaneError
from kproxy.plan.iptables.naming import MAX_CHAIN_NAME
from kproxy.rules.ir import (
    BUILTIN_CHAINS,
    EXTENSION_TARGETS,
    STANDARD_TARGETS,
    Ruleset,
    Table,
    Target,
)
from kproxy.rules.parse import parse_rule
from kproxy.rules.render import render_rule
from kproxy.rules.saved import SavedTable, parse_save, render_saved

# Target extensions a stock kernel knows (besides the ones kproxy writes).
KNOWN_TARGETS = (
    STANDARD_TARGETS
    | EXTENSION_TARGETS
    | frozenset(
        {"LOG", "NFLOG", "CT", "TRACE", "CONNMARK", "NOTRACK", "REDIRECT", "NETMAP", "TCPMSS"}
        | {"CHECKSUM", "NFQUEUE", "AUDIT", "CLASSIFY", "SET", "TPROXY", "DSCP", "TOS", "TTL"}
    )
)
# Targets registered for one table and some hooks only (the kernel's xt_target .table/.hooks).
_TARGET_TABLE = {
    "DNAT": "nat",
    "REDIRECT": "nat",
    "SNAT": "nat",
    "MASQUERADE": "nat",
    "REJECT": "filter",
}
_TARGET_HOOKS = {
    "DNAT": frozenset({"PREROUTING", "OUTPUT"}),
    "REDIRECT": frozenset({"PREROUTING", "OUTPUT"}),
    "SNAT": frozenset({"POSTROUTING", "INPUT"}),
    "MASQUERADE": frozenset({"POSTROUTING"}),
    "REJECT": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
}


class FakeDataplane:
    """Tables of one address family held as SavedTables, changed only through checked commits."""

    def __init__(self, family: int = 4, tables: Iterable[str] = TABLES) -> None:
        self.family = family
        self._tables = {name: _empty_table(name) for name in tables}
        self.commits = 0  # successful table commits
        self._applied: dict[str, Table] = {}  # what apply() committed last, per table
        self._foreign: set[str] = set()  # tables another program wrote since
        self.history: list[TableChanges] = []  # the changes of every successful commit
        self._failures: list[str] = []

    def read(self) -> dict[str, SavedTable]:
        return copy.deepcopy(self._tables)

    def dump(self) -> str:
        """The tables as iptables-save text (built-in chains' rules included)."""
        return render_saved(self.read())

    def load(self, text: str) -> None:
        """Add iptables-save text, e.g. a CNI's chains and rules, as another program would have
        written it before kproxy started. Checked like any commit."""
        for name, loaded in parse_save(text).items():
            staged = copy.deepcopy(self._tables.get(name) or _empty_table(name))
            staged.policies.update(loaded.policies)
            for chain, lines in loaded.chains.items():
                if chain not in staged.chains:
                    _create_chain(staged, chain)
                for line in lines:
                    if parse_rule(line)[0] != chain:
                        raise DataplaneError(f"table {name}: rule {line!r} outside chain {chain}")
                staged.chains[chain].extend(lines)
            self._commit(staged)
            self._foreign.add(name)

    def fail_next_commit(self, message: str = "injected failure") -> None:
        """Make the next non-empty table commit fail, as a concurrent writer or a missing kernel
        module would; the table is left unchanged."""
        self._failures.append(message)

    def apply(self, ruleset: Ruleset, full: bool = True) -> ApplyResult:
        """Make the tables hold `ruleset`; each table is committed once, atomically. A partial
        apply compares with the last commit unless another program wrote the table since."""
        result = ApplyResult()
        for desired in ruleset.tables:
            applied = self._applied.get(desired.name)
            changes = None
            if not full and applied is not None and desired.name not in self._foreign:
                changes = plan_table_changes_from(desired, applied)
            if changes is None:
                changes = plan_table_changes(desired, self._tables.get(desired.name))
            try:
                self.commit_changes(changes)
            except DataplaneError:
                self._applied.pop(desired.name, None)
                raise
            self._applied[desired.name] = desired
            self._foreign.discard(desired.name)
            result.tables.append(changes)
        return result

    def reading_ahead(self) -> AbstractContextManager[None]:
        return nullcontext()

    def cleanup(self) -> ApplyResult:
        """Remove every kproxy/kube-proxy chain and jump rule, nothing else."""
        result = ApplyResult()
        for name in TABLES:
            changes = plan_cleanup(self._tables.get(name) or SavedTable(name))
            self.commit_changes(changes)
            result.tables.append(changes)
        return result

    def commit_changes(self, changes: TableChanges) -> None:
        """Carry out a change set planned earlier, as IptablesDataplane._write does (tests use it
        to replay a stale plan)."""
        if changes.empty:
            return
        if self._failures:
            raise DataplaneError(f"writing table {changes.table} failed: {self._failures.pop(0)}")
        current = self._tables.get(changes.table) or _empty_table(changes.table)
        self._commit(_execute(changes, copy.deepcopy(current)))
        self.history.append(changes)

    def _commit(self, staged: SavedTable) -> None:
        check_table(staged)
        self._tables[staged.name] = _sorted(staged)
        self.commits += 1


def _empty_table(name: str) -> SavedTable:
    builtins = BUILTIN_CHAINS.get(name, ())
    return SavedTable(name, {c: "ACCEPT" for c in builtins}, {c: [] for c in builtins})


def _builtins(table: SavedTable) -> set[str]:
    return set(BUILTIN_CHAINS.get(table.name, ())) | set(table.policies)


def _sorted(table: SavedTable) -> SavedTable:
    """Chains in iptables-save order: built-in ones first, then user chains by name (libiptc
    keeps them sorted)."""
    builtins = [c for c in BUILTIN_CHAINS.get(table.name, ()) if c in table.chains]
    builtins += sorted(c for c in _builtins(table) if c in table.chains and c not in builtins)
    users = sorted(c for c in table.chains if c not in builtins)
    table.chains = {name: table.chains[name] for name in builtins + users}
    return table


def _refuse(table: SavedTable, problem: str) -> DataplaneError:
    return DataplaneError(f"writing table {table.name} failed: {problem}")


def _existing(table: SavedTable, chain: str) -> list[str]:
    lines = table.chains.get(chain)
    if lines is None:
        raise _refuse(table, f"no chain {chain}")
    return lines


def _create_chain(table: SavedTable, name: str) -> None:
    if name in table.chains:
        raise _refuse(table, f"chain {name} already exists")
    if len(name) > MAX_CHAIN_NAME:
        raise _refuse(table, f"chain name {name} is longer than {MAX_CHAIN_NAME} characters")
    if name in KNOWN_TARGETS or name in BUILTIN_CHAINS.get(table.name, ()) or not name:
        raise _refuse(table, f"{name!r} cannot be a user chain name")
    table.chains[name] = []


def _execute(changes: TableChanges, table: SavedTable) -> SavedTable:
    """The changes applied to `table` in the order TableEdit.apply (table_blob.py) applies them."""
    for builtin, positions in changes.remove_jumps.items():
        lines = _existing(table, builtin)
        for pos in sorted(positions, reverse=True):
            if not 0 <= pos < len(lines):
                raise _refuse(table, f"no rule {pos} in chain {builtin}")
            del lines[pos]
    for name in changes.create:
        _create_chain(table, name)
    for chain in changes.write:
        _existing(table, chain.name)[:] = [render_rule(chain.name, r) for r in chain.rules]
    for name in changes.delete:
        if name in _builtins(table):
            raise _refuse(table, f"cannot delete built-in chain {name}")
        _existing(table, name).clear()
    for name in changes.delete:
        users = [c for c, lines in table.chains.items() if name in _chain_targets(lines)]
        if users:
            raise _refuse(table, f"cannot delete chain {name}: still referenced from {users}")
        del table.chains[name]
    for jump in changes.insert_jumps:
        lines, line = _existing(table, jump.chain), render_rule(jump.chain, jump.rule)
        if jump.append:
            lines.append(line)
        else:
            lines.insert(0, line)
    return table


@lru_cache(maxsize=65536)
def _target_of(line: str) -> Target | None:
    try:
        return parse_rule(line)[1].target
    except ValueError as exc:
        raise DataplaneError(f"the fake dataplane cannot read rule {line!r}: {exc}") from exc


def _chain_targets(lines: Iterable[str]) -> set[str]:
    return {t.name for t in map(_target_of, lines) if t is not None}


def check_table(table: SavedTable) -> None:
    """Raise DataplaneError for anything in `table` the kernel would refuse to load."""
    builtins = _builtins(table)
    for chain in table.chains:
        if chain not in builtins and len(chain) > MAX_CHAIN_NAME:
            raise _refuse(table, f"chain name {chain} is longer than {MAX_CHAIN_NAME} characters")
    edges: dict[str, set[str]] = {}
    for chain, lines in table.chains.items():
        edges[chain] = set()
        for name in _chain_targets(lines):
            if name in builtins:
                raise _refuse(table, f"chain {chain} jumps to built-in chain {name}")
            if name in table.chains:
                edges[chain].add(name)
            elif name not in KNOWN_TARGETS:
                raise _refuse(table, f"chain {chain} jumps to {name}: no such chain or target")
            elif _TARGET_TABLE.get(name, table.name) != table.name:
                raise _refuse(table, f"target {name} is not valid in table {table.name}")
    loop = _find_loop(edges)
    if loop:
        raise _refuse(table, f"loop of jumps: {' -> '.join(loop)}")
    _check_hooks(table, edges, builtins)


def _find_loop(edges: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(chain: str, path: list[str]) -> list[str] | None:
        if chain in path:
            return [*path[path.index(chain) :], chain]
        if chain in done:
            return None
        for nxt in sorted(edges.get(chain, ())):
            loop = visit(nxt, [*path, chain])
            if loop:
                return loop
        done.add(chain)
        return None

    for chain in sorted(edges):
        loop = visit(chain, [])
        if loop:
            return loop
    return None


def _check_hooks(table: SavedTable, edges: dict[str, set[str]], builtins: set[str]) -> None:
    """Each hook-restricted target must be reachable only from the hooks it is registered for."""
    hooks: dict[str, set[str]] = {chain: set() for chain in table.chains}
    for hook in builtins & set(table.chains):
        todo, seen = [hook], {hook}
        while todo:
            chain = todo.pop()
            hooks[chain].add(hook)
            todo.extend(n for n in edges.get(chain, ()) if n not in seen)
            seen.update(edges.get(chain, ()))
    for chain, lines in table.chains.items():
        for name in _chain_targets(lines) & _TARGET_HOOKS.keys():
            if name in table.chains:
                continue
            bad = hooks[chain] - _TARGET_HOOKS[name]
            if bad:
                raise _refuse(table, f"{name} in chain {chain} is reachable from {sorted(bad)}")
