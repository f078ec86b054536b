"""A packet tracer over the nftables mode's IR: where the first packet of a NEW connection goes
through kproxy's `kube-proxy` table, and why, as the same Explanation the x_tables tracer gives
(rules/explain.py), so `kproxy trace` prints both alike.

The walk: the table's base chains run hook by hook, each hook's chains by priority. A packet from
a pod or from outside enters prerouting, then input (addressed to the node, after DNAT) or
forward and postrouting; the node's own packet enters output, then postrouting, then input when
it is addressed to the node. jump/goto/return, verdict maps and sets are followed; `numgen
random mod N 0` forks the walk (each side with its share); a dynamic (affinity) set never holds
the client (a new one). Only this table is walked: it is kproxy's alone, and other programs'
tables are not evaluated (the caller says so in `notes`). Pure: the same table, the same answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property

from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.ir import Dnat, NftTable
from kproxy.plan.nftables.trace_walk import Flow, TableIndex, Walk, canonical, walk_all
from kproxy.rules.explain import Branch, Explanation, Outcome, by_share
from kproxy.rules.trace import Hook, Packet, host_port

_SERVICE_MAPS = (n.SERVICE_IPS, n.SERVICE_NODEPORTS, n.FIREWALL_IPS)
_PORT_CHAIN_PREFIXES = ("service-", "local-", "external-", "firewall-")


@dataclass(frozen=True)
class NftTraceTables:
    """One family's `kube-proxy` table for `kproxy trace` (a Traceable): live or planned."""

    table: NftTable
    source: str = "planned"
    notes: tuple[str, ...] = ()  # said under the header (what is not walked)
    unreadable: tuple[str, ...] = ()  # rules of the live table the tracer could not read

    def explain(
        self, packet: Packet, hook: Hook, origin: str, local_addresses: Iterable[str]
    ) -> Explanation:
        return explain_nft_packet(self, packet, hook, origin, local_addresses)

    def endpoint_addresses(self) -> set[str]:
        return {
            canonical(s.ip)
            for chain in self.table.chains
            for rule in chain.rules
            for s in rule.statements
            if isinstance(s, Dnat)
        }

    @cached_property
    def index(self) -> TableIndex:
        return TableIndex(self.table)


def service_of_chain(name: str) -> str | None:
    """`ns/name:port` from a service port's chain name (`PREFIX-HASH-ns/name/proto/port`)."""
    if not name.startswith(_PORT_CHAIN_PREFIXES) or name.endswith("..."):
        return None
    rest = name.partition("-")[2][9:]
    parts = rest.split("/")
    if len(parts) != 4:
        return None
    namespace, service, _proto, port = parts
    return f"{namespace}/{service}:{port}" if port else f"{namespace}/{service}"


def _entry(w: Walk) -> tuple[str | None, str | None]:
    """The service port and how it was reached, from the first map hit leading to its chains."""
    firewalled = any(m == n.FIREWALL_IPS for m, _ in w.hits)
    for map_name, element in w.hits:
        if map_name not in _SERVICE_MAPS or element.verdict is None:
            continue
        service = service_of_chain(element.verdict.chain or "")
        if service is None:
            continue
        if map_name == n.SERVICE_NODEPORTS:
            return service, "node port"
        if map_name == n.FIREWALL_IPS or firewalled:
            return service, "loadbalancer IP"
        chain = element.verdict.chain or ""
        if chain.startswith("external-"):
            return service, "external IP or loadbalancer IP"
        return service, "cluster IP"
    return None, None


def _branch(share: float, w: Walk, flow: Flow) -> Branch:
    service, entry = _entry(w)
    if flow is Flow.REJECT:
        outcome = Outcome.REJECTED
    elif flow is Flow.DROP:
        outcome = Outcome.DROPPED
    elif w.dnat is not None:
        outcome = Outcome.DNAT
    else:
        outcome = Outcome.ACCEPTED if service else Outcome.UNTOUCHED
    reason = None
    if w.masqueraded:
        reason = w.masquerade_reason or "a rule in postrouting masquerades it"
    return Branch(
        share=share,
        outcome=outcome,
        hops=tuple(w.hops),
        destination=host_port(*w.dnat) if w.dnat else None,
        masqueraded=w.masqueraded,
        masquerade_reason=reason,
        service=service,
        entry=entry,
        stopped_by=w.stopped_by if flow in (Flow.DROP, Flow.REJECT) else None,
    )


def explain_nft_packet(
    tables: NftTraceTables,
    packet: Packet,
    hook: Hook,
    origin: str,
    local_addresses: Iterable[str],
) -> Explanation:
    """Every way `packet` (the first of a NEW connection) can go through the table."""
    local = frozenset(canonical(a) for a in local_addresses)
    packet = replace(packet, src=canonical(packet.src), dst=canonical(packet.dst))
    walks = walk_all(tables.index, packet, hook, local)
    branches = by_share(_branch(share, w, flow) for share, w, flow in walks)
    family, source = tables.table.family, tables.source
    affinity = next((w.affinity for _, w, _ in walks if w.affinity), None)
    return Explanation(
        packet, hook, origin, family, source, branches, affinity, tables.unreadable, tables.notes
    )
