"""What `kproxy trace` and `kproxy dump --diff` read of the x_tables modes: the node's tables in
one snapshot (for the tracer: every program's rules, with which chains are kube-proxy's), the
tables as planned, and the chains the next sync would change, as a unified diff per chain.

The snapshot is read under the xtables lock, so it never straddles one of the agent's commits
(the agent commits each table under the same lock): every table is as one sync left it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping

from kproxy.dataplane.base import ChainDiff
from kproxy.dataplane.xtables.backends import read_backend_tables
from kproxy.dataplane.xtables.diff import is_xtables_chain, owned_part, plan_table_changes
from kproxy.errors import DataplaneError
from kproxy.rules.explain import Relay, TraceTables
from kproxy.rules.ir import BUILTIN_CHAINS, Ruleset
from kproxy.rules.parse import parse_table_leniently
from kproxy.rules.render import render_rule
from kproxy.rules.saved import SavedTable, render_saved


def read_snapshot(
    family: int, lock_timeout: float, backend: str | None = None
) -> dict[str, SavedTable]:
    """Every table kproxy writes, from `backend` (None: the one in use, see backends.py), the
    legacy tables while holding the xtables lock."""
    if os.geteuid() != 0:
        raise DataplaneError(
            "reading the live tables needs root (CAP_NET_ADMIN); without root, give "
            "--manifests PATH to work on what kproxy would write instead"
        )
    return read_backend_tables(family, backend, lock_timeout=lock_timeout)


def read_xtables_live(family: int, backend: str | None = None) -> str:
    """What the kernel holds of kproxy's (and kube-proxy's) chains, as iptables-save text, from
    `backend` (None: the one holding kproxy's chains, else the node's; see backends.py)."""
    tables = read_backend_tables(family, backend)
    return render_saved({name: owned_part(t) for name, t in tables.items()})


def tables_from_saved(
    saved: Mapping[str, SavedTable], family: int, relay_chains: frozenset[str] = frozenset()
) -> TraceTables:
    """The tracer's view of tables read from the kernel: kube-proxy's chains of either x_tables
    mode are marked as kproxy's; `relay_chains` hand packets to the userspace relay."""
    tables, unreadable = [], []
    policies: dict[tuple[str, str], str] = {}
    for name, table in saved.items():
        parsed, lines = parse_table_leniently(table)
        tables.append(parsed)
        unreadable.extend(lines)
        policies.update({(name, chain): policy for chain, policy in table.policies.items()})
    chains = frozenset(
        name for table in saved.values() for name in table.chains if is_xtables_chain(name)
    )
    return TraceTables(
        ruleset=Ruleset(family, tuple(tables)),
        kproxy_chains=chains,
        policies=policies,
        relay_chains=relay_chains,
        unreadable=tuple(unreadable),
        source="live",
    )


def planned_tables(
    ruleset: Ruleset,
    relay_chains: frozenset[str] = frozenset(),
    relays: Mapping[str, Relay] | None = None,
) -> TraceTables:
    """The tracer's view of a planned Ruleset: every chain in it is kproxy's."""
    chains = frozenset(c.name for t in ruleset.tables for c in t.chains)
    return TraceTables(
        ruleset=ruleset, kproxy_chains=chains, relay_chains=relay_chains, relays=relays or {}
    )


def plan_chain_diffs(desired: Ruleset, current: Mapping[str, SavedTable]) -> list[ChainDiff]:
    """What a full sync of `desired` would change in `current`, chain by chain: the chains it
    writes and deletes, and the jump rules it adds to or removes from built-in chains."""
    diffs: list[ChainDiff] = []
    for table in desired.tables:
        saved = current.get(table.name, SavedTable(table.name))
        changes = plan_table_changes(table, saved)
        for chain in changes.write:
            old = saved.chains.get(chain.name, [])
            new = [render_rule(chain.name, rule) for rule in chain.rules]
            change = "added" if chain.name in changes.create else "rewritten"
            diffs.append(_diff(desired.family, table.name, chain.name, change, old, new))
        for name in changes.delete:
            old = saved.chains.get(name, [])
            diffs.append(_diff(desired.family, table.name, name, "removed", old, []))
        for builtin in BUILTIN_CHAINS.get(table.name, ()):
            old = saved.chains.get(builtin, [])
            removed = set(changes.remove_jumps.get(builtin, ()))
            inserted = [
                render_rule(j.chain, j.rule)
                for j in reversed(changes.insert_jumps)
                if j.chain == builtin and not j.append
            ]
            appended = [
                render_rule(j.chain, j.rule)
                for j in changes.insert_jumps
                if j.chain == builtin and j.append
            ]
            if not (removed or inserted or appended):
                continue
            kept = [line for i, line in enumerate(old) if i not in removed]
            new = inserted + kept + appended
            diffs.append(_diff(desired.family, table.name, builtin, "rewritten", old, new))
    return diffs


def _diff(
    family: int, table: str, chain: str, change: str, old: list[str], new: list[str]
) -> ChainDiff:
    where = f"{'ip6tables' if family == 6 else 'iptables'} {table} {chain}"
    lines = difflib.unified_diff(
        old, new, fromfile=f"{where} (kernel)", tofile=f"{where} (next sync)", lineterm=""
    )
    return ChainDiff(family, table, chain, change, tuple(lines))
