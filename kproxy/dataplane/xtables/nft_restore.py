"""TableChanges as `iptables-nft-restore --noflush` input: one table, one transaction.

In --noflush mode a `:CHAIN - [0:0]` line creates the chain or flushes just that chain, so only
the chains that change are named; `-X` deletes a chain (flushed first, in the same transaction);
jump rules in built-in chains are removed by their rule spec (`-D`, which finds the rule where it
is now, whatever another program inserted meanwhile) and inserted at the top (`-I CHAIN 1`) or
appended. Nothing else in the table is touched: kubelet's, the CNI's and firewalld's rules stay.
"""

from __future__ import annotations

from kproxy.dataplane.xtables.diff import TableChanges
from kproxy.rules.render import render_rule
from kproxy.rules.saved import SavedTable


def render_restore(changes: TableChanges, current: SavedTable | None) -> str:
    """The restore input carrying out `changes`; `current` is the table they were planned from
    (where removed jump rules are read; None when there are none)."""
    lines = [f"*{changes.table}"]
    # Sorted, as iptables-save prints them: iptables-nft-restore takes 3x as long at 1,000
    # services to create the same chains in the planner's order.
    flushed = sorted([chain.name for chain in changes.write] + list(changes.delete))
    lines.extend(f":{name} - [0:0]" for name in flushed)
    for builtin, positions in sorted(changes.remove_jumps.items()):
        held = current.chains.get(builtin, []) if current is not None else []
        for pos in positions:
            if pos < len(held):
                lines.append("-D" + held[pos][2:])  # `-A CHAIN spec` -> `-D CHAIN spec`
    for chain in changes.write:
        lines.extend(render_rule(chain.name, rule) for rule in chain.rules)
    lines.extend(f"-X {name}" for name in changes.delete)
    for jump in changes.insert_jumps:
        rule = render_rule(jump.chain, jump.rule)
        lines.append(rule if jump.append else f"-I {jump.chain} 1{rule[2 + len(jump.chain) + 1 :]}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
