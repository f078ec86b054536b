"""What must change in a table to turn what the kernel holds into what kproxy wants.

Pure: compares rendered lines chain by chain, so a chain whose rules are already right is left
alone, and a second sync of the same state changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kproxy.plan.iptables.chains import is_cleanup_chain, is_owned_chain, is_written_chain
from kproxy.rules.ir import BUILTIN_CHAINS, Chain, JumpRule, Table
from kproxy.rules.parse import parse_rule
from kproxy.rules.render import render_rule
from kproxy.rules.saved import SavedTable


@dataclass
class TableChanges:
    table: str
    create: list[str] = field(default_factory=list)
    write: list[Chain] = field(default_factory=list)  # created or rewritten chains, in full
    delete: list[str] = field(default_factory=list)
    insert_jumps: list[JumpRule] = field(default_factory=list)  # each goes to the top of its chain
    remove_jumps: dict[str, list[int]] = field(default_factory=dict)  # chain -> 0-based positions
    unchanged: int = 0
    read_kernel: bool = (
        True  # compared with the kernel's rules (a full sync) or with the last commit
    )

    @property
    def empty(self) -> bool:
        return not (
            self.create or self.write or self.delete or self.insert_jumps or self.remove_jumps
        )

    @property
    def rules_written(self) -> int:
        return sum(len(c.rules) for c in self.write) + len(self.insert_jumps)


def _rendered(chain: Chain) -> list[str]:
    return [render_rule(chain.name, rule) for rule in chain.rules]


def is_xtables_chain(name: str) -> bool:
    """A chain of either x_tables mode's, kproxy's or kube-proxy's (the shared ones included)."""
    return is_written_chain(name) or is_cleanup_chain(name)


def plan_table_changes(desired: Table, current: SavedTable | None) -> TableChanges:
    """Chains to create, rewrite and delete, and jump rules to insert, for one table."""
    current = current or SavedTable(desired.name)
    changes = TableChanges(desired.name)
    wanted = set()
    for chain in desired.chains:
        wanted.add(chain.name)
        have = current.chains.get(chain.name)
        if have is None:
            changes.create.append(chain.name)
            changes.write.append(chain)
        elif have != _rendered(chain):
            changes.write.append(chain)
        else:
            changes.unchanged += 1
    builtins = set(BUILTIN_CHAINS.get(desired.name, ()))
    # Every mode's chains are kproxy's: a mode switch deletes the other mode's chains, and the
    # jumps to them from the built-in chains in the same commit (the kernel refuses to delete a
    # chain still jumped to), after the new mode's rules are in: one atomic commit per table.
    changes.delete = sorted(
        name
        for name in current.chains
        if name not in builtins and is_cleanup_chain(name) and name not in wanted
    )
    gone = set(changes.delete)
    for builtin in sorted(builtins):
        lines = current.chains.get(builtin, [])
        positions = [i for i, line in enumerate(lines) if _jumps_to(line, gone.__contains__)]
        if positions:
            changes.remove_jumps[builtin] = positions
    for jump in desired.jumps:
        if render_rule(jump.chain, jump.rule) not in current.chains.get(jump.chain, []):
            changes.insert_jumps.append(jump)
    return changes


def plan_table_changes_from(desired: Table, applied: Table) -> TableChanges | None:
    """The changes from what kproxy committed last (`applied`) to `desired`, without reading the
    kernel; valid only while nobody else wrote the table. None when the jump rules in built-in
    chains differ: those are checked against the kernel."""
    if desired is applied:  # the very table committed last: nothing to compare
        return TableChanges(desired.name, unchanged=len(desired.chains), read_kernel=False)
    if desired.jumps != applied.jumps:
        return None
    before = {c.name: c for c in applied.chains}
    changes = TableChanges(desired.name, read_kernel=False)
    for chain in desired.chains:
        old = before.pop(chain.name, None)
        if old is None:
            changes.create.append(chain.name)
            changes.write.append(chain)
        elif old is chain or old == chain:
            changes.unchanged += 1
        else:
            changes.write.append(chain)
    changes.delete = sorted(name for name in before if is_owned_chain(name))
    return changes


def plan_cleanup(current: SavedTable) -> TableChanges:
    """Remove every chain of either mode and every rule in a built-in chain that jumps to one."""
    changes = TableChanges(current.name)
    builtins = BUILTIN_CHAINS.get(current.name, ())
    for chain in builtins:
        positions = [
            i
            for i, line in enumerate(current.chains.get(chain, []))
            if _jumps_to(line, is_cleanup_chain)
        ]
        if positions:
            changes.remove_jumps[chain] = positions
    changes.delete = sorted(n for n in current.chains if n not in builtins and is_cleanup_chain(n))
    return changes


def _jumps_to(line: str, wanted: Callable[[str], bool]) -> bool:
    """Whether the rule's target is a chain `wanted` accepts. Parsed, not split on spaces: a
    comment may contain `-j KUBE-SERVICES` too."""
    try:
        target = parse_rule(line)[1].target
    except ValueError:  # a rule the IR cannot hold is never one kproxy wrote
        return False
    return target is not None and wanted(target.name)


def owned_part(current: SavedTable) -> SavedTable:
    """What kproxy writes in a table: its chains (shared ones included), and the jump rules to
    them in built-in chains."""
    builtins = BUILTIN_CHAINS.get(current.name, ())
    part = SavedTable(current.name)
    for chain in builtins:
        jumps = [
            line for line in current.chains.get(chain, []) if _jumps_to(line, is_written_chain)
        ]
        if jumps:
            part.policies[chain] = current.policies.get(chain, "ACCEPT")
            part.chains[chain] = jumps
    for name in sorted(current.chains):
        if name not in builtins and is_written_chain(name):
            part.chains[name] = list(current.chains[name])
    return part
