"""Where a packet goes, and why: the tracer's walks turned into what an operator reads.

`explain_packet` follows every probability branch (trace.weighted_outcomes) through the tables a
proxy mode hands over (TraceTables) and says, per branch, which rules matched and why, what the
packet ends as (DNATed to an endpoint, relayed by kproxy's own listener, rejected, dropped,
accepted, or not a Service at all), whether it is masqueraded and which rule decided that. Rules
of other programs are named by their text. Pure: no I/O, the same tables give the same answer.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kproxy.rules.ir import Rule, Ruleset, Table
from kproxy.rules.render import render_rule
from kproxy.rules.trace import Hook, Packet, TraceResult, Verdict, host_port, weighted_outcomes

MARK_MASQ_CHAIN = "KUBE-MARK-MASQ"  # upstream's name; every mode that masquerades marks here


@dataclass(frozen=True, slots=True)
class Relay:
    """A userspace-mode listener's choice: the endpoints it picks among, round robin."""

    endpoints: tuple[str, ...]
    affinity_seconds: int | None = None


@dataclass(frozen=True)
class TraceTables:
    """One family's tables as a mode hands them to the tracer: live (every program's rules) or
    planned (kproxy's only)."""

    ruleset: Ruleset
    kproxy_chains: frozenset[str]  # user chains that are kproxy's (jumps to them are too)
    policies: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # Chains whose NAT targets hand the packet to kproxy's own listener (the userspace portals).
    relay_chains: frozenset[str] = frozenset()
    # Per service port ("ns/name:port"; "ns/name:port external" for the second listener of a
    # port whose traffic policies differ), what its relay picks among, when known.
    relays: Mapping[str, Relay] = field(default_factory=dict)
    # Rule lines of other programs the rule IR cannot hold: never evaluated, named in the answer.
    unreadable: tuple[str, ...] = ()
    source: str = "planned"  # "live" or "planned": said in the output

    def explain(
        self, packet: Packet, hook: Hook, origin: str, local_addresses: Iterable[str]
    ) -> Explanation:
        return explain_packet(self, packet, hook, origin, local_addresses)

    def endpoint_addresses(self) -> set[str]:
        """The addresses the tables DNAT to: a source among them is a pod."""
        found = set()
        for table in self.ruleset.tables:
            for chain in table.chains:
                for rule in chain.rules:
                    opt = rule.target.get("to-destination") if rule.target else None
                    if opt is not None:
                        found.add(opt.value.rsplit(":", 1)[0].strip("[]"))
        return found


class Traceable(Protocol):
    """What a proxy mode hands `kproxy trace` for one family (ProxyMode.trace_live/trace_plan).
    TraceTables is the x_tables modes'; a mode with tables of another kind (nftables) walks
    them itself and answers with the same Explanation: hops are (table, chain, rule text, why)."""

    def explain(
        self, packet: Packet, hook: Hook, origin: str, local_addresses: Iterable[str]
    ) -> Explanation: ...

    def endpoint_addresses(self) -> set[str]: ...


class Outcome(enum.StrEnum):
    DNAT = "dnat"  # DNATed to an endpoint by the kernel
    RELAYED = "relayed"  # handed to kproxy's userspace listener
    REJECTED = "rejected"
    DROPPED = "dropped"
    ACCEPTED = "accepted"  # a kproxy rule accepted it without NAT (a health check port)
    UNTOUCHED = "not-a-service"  # nothing of kproxy's acted on it


@dataclass(frozen=True, slots=True)
class Hop:
    table: str
    chain: str
    rule: str  # as iptables-save prints it
    why: tuple[str, ...]  # the conditions it met, in words
    kproxy: bool  # False: another program's rule


@dataclass(frozen=True)
class Branch:
    share: float
    outcome: Outcome
    hops: tuple[Hop, ...]
    destination: str | None = None  # `ip:port` after DNAT or REDIRECT
    masqueraded: bool = False
    masquerade_reason: str | None = None
    service: str | None = None  # "ns/name:port"
    entry: str | None = None  # how the service was reached: "cluster IP", "node port", ...
    relay: Relay | None = None
    skipped: tuple[str, ...] = ()  # rules passed without evaluating them, with why
    # What rejected or dropped it: a rule's text (`[not kproxy's] ...` for another program's),
    # or a built-in chain's DROP policy.
    stopped_by: str | None = None


@dataclass(frozen=True)
class Explanation:
    packet: Packet
    hook: Hook
    origin: str  # "pod", "outside" or "node"
    family: int
    source: str  # "live" or "planned"
    branches: tuple[Branch, ...]
    affinity_seconds: int | None = None
    unreadable: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what the walk covered and what not, said under the header

    @property
    def outcome(self) -> Outcome:
        """The outcome of most of the traffic (branches differ only by probability)."""
        return max(self.branches, key=lambda b: b.share).outcome

    @property
    def service(self) -> str | None:
        return next((b.service for b in self.branches if b.service), None)

    def destinations(self) -> list[tuple[str, float]]:
        """Each DNAT or relay destination with its share, largest first."""
        shares: dict[str, float] = {}
        for b in self.branches:
            if b.destination is not None:
                shares[b.destination] = shares.get(b.destination, 0.0) + b.share
        return sorted(shares.items(), key=lambda item: (-item[1], item[0]))

    def foreign_rules(self) -> list[str]:
        """Rules of other programs the packet matched on its way, each once, in order."""
        seen: dict[str, None] = {}
        for b in self.branches:
            for hop in b.hops:
                if not hop.kproxy:
                    seen.setdefault(hop.rule, None)
        return list(seen)


def explain_packet(
    tables: TraceTables,
    packet: Packet,
    hook: Hook,
    origin: str,
    local_addresses: Iterable[str],
) -> Explanation:
    """Every way `packet` (the first of a NEW connection) can go through `tables`."""
    local = tuple(local_addresses)
    outcomes = weighted_outcomes(
        tables.ruleset,
        packet,
        hook,
        local_addresses=local,
        policies=tables.policies,
        lenient=True,
    )
    branches = by_share(_branch(tables, hook, share, result) for share, result in outcomes)
    family, source = tables.ruleset.family, tables.source
    affinity = _affinity(tables, outcomes)
    return Explanation(packet, hook, origin, family, source, branches, affinity, tables.unreadable)


def by_share(branches: Iterable[Branch]) -> tuple[Branch, ...]:
    """Branches in the order an explanation lists them: most traffic first."""
    return tuple(sorted(branches, key=lambda b: (-b.share, b.destination or "")))


def _chain_rules(table: Table, chain: str) -> tuple[Rule, ...]:
    """A chain's rules in kernel order (built-in chains: the jumps, first inserted last)."""
    found = table.chain(chain)
    if found is not None:
        return found.rules
    return tuple(j.rule for j in reversed(table.jumps) if j.chain == chain)


def _rule_at(ruleset: Ruleset, table: str, chain: str, index: int) -> Rule:
    return _chain_rules(ruleset.table(table) or Table(table), chain)[index]


def _is_kproxy(tables: TraceTables, chain: str, rule: Rule) -> bool:
    if chain in tables.kproxy_chains:
        return True
    return rule.target is not None and rule.target.name in tables.kproxy_chains


def _branch(tables: TraceTables, hook: Hook, share: float, result: TraceResult) -> Branch:
    hops: list[Hop] = []
    rules: list[tuple[str, Rule, bool]] = []
    for table, chain, index in result.visited:
        rule = _rule_at(tables.ruleset, table, chain, index)
        kproxy = _is_kproxy(tables, chain, rule)
        hops.append(Hop(table, chain, render_rule(chain, rule), describe_rule(rule), kproxy))
        rules.append((chain, rule, kproxy))
    service, entry = _service(rules)
    outcome = _outcome(tables, result, rules, service)
    destination = host_port(*result.dnat) if result.dnat else None
    relay = _relay(tables, service, entry) if outcome is Outcome.RELAYED else None
    skipped = tuple(
        f"{render_rule(chain, _rule_at(tables.ruleset, table, chain, index))}  ({why})"
        for table, chain, index, why in result.skipped
    )
    return Branch(
        share=share,
        outcome=outcome,
        hops=tuple(hops),
        destination=destination,
        masqueraded=result.masqueraded,
        masquerade_reason=_masquerade_reason(rules) if result.masqueraded else None,
        service=service,
        entry=entry,
        relay=relay,
        skipped=skipped,
        stopped_by=_stopped_by(tables, hook, hops)
        if result.verdict is not Verdict.ACCEPTED
        else None,
    )


_PATHS = {
    "PREROUTING": (("nat", "PREROUTING"), ("filter", "INPUT"), ("filter", "FORWARD")),
    "OUTPUT": (("nat", "OUTPUT"), ("filter", "OUTPUT")),
}


def _stopped_by(tables: TraceTables, hook: Hook, hops: list[Hop]) -> str:
    """The rule that rejected or dropped the packet, or the built-in chain's policy."""
    if hops and re.search(r" -j (DROP|REJECT)\b", hops[-1].rule):
        hop = hops[-1]
        return hop.rule if hop.kproxy else f"another program's rule: {hop.rule}"
    for table, chain in _PATHS[hook]:
        if tables.policies.get((table, chain)) == "DROP":
            return f"the DROP policy of {table} {chain}"
    return hops[-1].rule if hops else "a built-in chain's policy"


def _relay(tables: TraceTables, service: str | None, entry: str | None) -> Relay | None:
    """The listener's choice; a port split by traffic policy has one for external traffic."""
    if service is None:
        return None
    if entry != "cluster IP" and f"{service} external" in tables.relays:
        return tables.relays[f"{service} external"]
    return tables.relays.get(service)


_ENTRY_SUFFIXES = ("cluster IP", "external IP", "loadbalancer IP", "health check node port")


def _service(rules: list[tuple[str, Rule, bool]]) -> tuple[str | None, str | None]:
    """The service port from the first kproxy comment that names one (`ns/name:port ...`),
    and how it was reached."""
    for chain, rule, kproxy in rules:
        text = rule.comment if kproxy else None
        if not text or "/" not in text.split(" ")[0]:
            continue
        name, _, rest = text.partition(" ")
        if chain == "KUBE-NODEPORTS" or "NODEPORT" in chain:
            return name, "node port"
        return name, rest if rest in _ENTRY_SUFFIXES else None
    return None, None


def _outcome(
    tables: TraceTables,
    result: TraceResult,
    rules: list[tuple[str, Rule, bool]],
    service: str | None,
) -> Outcome:
    if result.verdict is Verdict.REJECTED:
        return Outcome.REJECTED
    if result.verdict is Verdict.DROPPED:
        return Outcome.DROPPED
    if result.dnat is not None:
        nat = [c for c, r, _ in rules if r.target and r.target.name in ("DNAT", "REDIRECT")]
        if nat and nat[-1] in tables.relay_chains:
            return Outcome.RELAYED
        return Outcome.DNAT
    return Outcome.ACCEPTED if service else Outcome.UNTOUCHED


def _masquerade_reason(rules: list[tuple[str, Rule, bool]]) -> str:
    """Why the packet is masqueraded: the rule that marked it (or another program's SNAT)."""
    for chain, rule, kproxy in rules:
        if kproxy and rule.target is not None and rule.target.name == MARK_MASQ_CHAIN:
            return _mark_reason(chain, rule)
    for _chain, rule, kproxy in rules:
        if not kproxy and rule.target and rule.target.name in ("MASQUERADE", "SNAT"):
            return "another program's rule in nat POSTROUTING source-NATs it"
    return "a rule in nat POSTROUTING source-NATs it"


def _mark_reason(chain: str, rule: Rule) -> str:
    comment = rule.comment or ""
    src_local = rule.match("addrtype")
    if rule.src and rule.src_invert:
        return f"its source is outside {rule.src}, the pods' range (detectLocalMode)"
    if rule.in_iface and rule.in_invert:
        return f"it did not arrive on a pod interface ({rule.in_iface}; detectLocalMode)"
    if rule.src and not rule.src_invert:
        return f"hairpin: the endpoint {rule.src.split('/')[0]} reaches itself via the service"
    if src_local is not None:
        return "its source is one of the node's addresses (external traffic policy Local)"
    if comment.startswith("masquerade traffic for"):
        return "it came in through a node port, external IP or load-balancer IP (policy Cluster)"
    if comment.endswith("cluster IP"):
        return "masqueradeAll is set"
    return f"rule {render_rule(chain, rule)}"


def _affinity(tables: TraceTables, outcomes: list[tuple[float, TraceResult]]) -> int | None:
    """ClientIP affinity: a chain on the path that checks xt_recent lists first."""
    for _, result in outcomes:
        for table, chain, index in result.visited:
            rule = _rule_at(tables.ruleset, table, chain, index)
            target = rule.target.name if rule.target else ""
            for candidate in _chain_rules(tables.ruleset.table(table) or Table(table), target):
                recent = candidate.match("recent")
                seconds = recent.get("seconds") if recent else None
                if recent is not None and recent.get("rcheck") and seconds is not None:
                    return int(seconds.value)
    return None


def describe_rule(rule: Rule) -> tuple[str, ...]:
    """The conditions a rule sets, each in words (the rule matched, so all of them held)."""
    why: list[str] = []
    for flag, value, invert in (
        ("source", rule.src, rule.src_invert),
        ("destination", rule.dst, rule.dst_invert),
        ("in-interface", rule.in_iface, rule.in_invert),
        ("out-interface", rule.out_iface, rule.out_invert),
    ):
        if value is not None:
            why.append(f"{flag} {'not ' if invert else ''}{_net(value)}")
    if rule.protocol is not None:
        why.append(f"protocol {'not ' if rule.protocol_invert else ''}{rule.protocol}")
    for match in rule.matches:
        why.extend(_describe_match(match.name, [(o.name, o.value, o.invert) for o in match.opts]))
    return tuple(why) or ("every packet",)


def _net(value: str) -> str:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return value
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _describe_match(name: str, opts: list[tuple[str, str, bool]]) -> list[str]:
    out = []
    for opt, value, invert in opts:
        neg = "not " if invert else ""
        if name == "comment":
            continue
        if opt in ("dport", "sport"):
            out.append(f"{'destination' if opt == 'dport' else 'source'} port {neg}{value}")
        elif name == "statistic" and opt == "probability":
            out.append(f"picked at random (probability {float(value):.4g})")
        elif name == "statistic":
            continue
        elif opt in ("ctstate", "state"):
            out.append(f"connection state {neg}{value}")
        elif opt in ("dst-type", "src-type"):
            where = "destination" if opt == "dst-type" else "source"
            out.append(f"{where} is {neg}a node address ({value})")
        elif name == "mark":
            out.append(f"packet mark {neg}{value}")
        elif name == "recent" and opt in ("rcheck", "update"):
            out.append(f"{neg}the client is in the affinity list")
        elif name == "recent" and opt == "set":
            out.append("remembers the client in the affinity list")
        elif name == "recent":
            continue
        else:
            out.append(f"{name} {neg}--{opt} {value}".rstrip())
    return out
