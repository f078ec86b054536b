"""What the two x_tables modes (iptables, userspace) share: the nat and filter tables. Each
mode's chains live beside the other's there, so the iptables mode must know the userspace
mode's chains to remove them on a switch (in the commit that writes its own, since the kernel
refuses to delete a chain still jumped to) and in `cleanup`; and both count rules alike.

The userspace chains are upstream kube-proxy's userspace proxier's five names, so kproxy's
cleanup and `kube-proxy --cleanup` each remove the other's leftovers."""

from __future__ import annotations

from collections.abc import Mapping

from kproxy.rules.ir import Ruleset

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL = "KUBE-NODEPORT-NON-LOCAL"

USERSPACE_NAT_CHAINS = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
USERSPACE_FILTER_CHAINS = (NODEPORT_NON_LOCAL,)
USERSPACE_CHAINS = frozenset(USERSPACE_NAT_CHAINS + USERSPACE_FILTER_CHAINS)


def is_userspace_chain(name: str) -> bool:
    """Chains the userspace mode creates, rewrites and deletes outright (no per-service ones)."""
    return name in USERSPACE_CHAINS


def count_rules(rulesets: Mapping[int, Ruleset]) -> dict[str, int]:
    """Rules kproxy owns per table, over the families (kube-proxy's rules_total metric)."""
    counts: dict[str, int] = {}
    for ruleset in rulesets.values():
        for table in ruleset.tables:
            rules = len(table.jumps) + sum(len(c.rules) for c in table.chains)
            counts[table.name] = counts.get(table.name, 0) + rules
    return counts
