"""A packet tracer over the rule IR: what the kernel does with the first packet of a NEW
connection. A packet from a pod or from outside (`PREROUTING`) goes nat PREROUTING, routing, filter
FORWARD (filter INPUT if addressed to the node), nat POSTROUTING; a locally generated one (`OUTPUT`)
goes nat OUTPUT, filter OUTPUT, nat POSTROUTING. Built-in chains run the table's JumpRules in kernel
order (each was inserted at the top: the last listed runs first), then their policy.

Probability matches ask a `choose` callback; `possible_outcomes` explores both branches of each.
xt_recent lists live in an explicit RecentState so that session affinity can be tested. A match or
target the tracer does not know raises TraceError rather than being guessed; with `lenient` (for
live tables, where other programs' rules use any extension) such a rule is recorded in
`TraceResult.skipped` instead: an unknown match never matches, an unknown target lets the packet
go on to the next rule."""

from __future__ import annotations

import enum
import ipaddress
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypedDict, TypeVar, Unpack

from kproxy.rules.ir import Rule, Ruleset, Table, Target
from kproxy.rules.trace_matches import TraceError as TraceError
from kproxy.rules.trace_matches import UnknownExtension, opt_value, rule_matches, value_mask

Hook = Literal["PREROUTING", "OUTPUT"]
Choose = Callable[[float], bool]
T = TypeVar("T")
_MAX_DEPTH = 64


class Verdict(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DROPPED = "dropped"


class _Flow(enum.Enum):
    """What evaluating a chain (or one rule's target) leads to."""

    NEXT = "next"  # go on with the next rule
    RETURN = "return"  # back to the calling chain (or the policy of a built-in chain)
    ACCEPT = "accept"  # the table is done with the packet; NAT targets end here too
    DROP = "drop"
    REJECT = "reject"


_VERDICTS = {_Flow.DROP: Verdict.DROPPED, _Flow.REJECT: Verdict.REJECTED}


@dataclass(frozen=True, slots=True)
class Packet:
    src: str
    dst: str
    protocol: str = "tcp"
    dport: int = 0
    sport: int = 40000
    in_iface: str | None = None
    out_iface: str | None = None
    mark: int = 0


@dataclass
class RecentState:
    """xt_recent lists: list name -> masked source address -> time of its last `--set`."""

    lists: dict[str, dict[str, float]] = field(default_factory=dict)

    def seen(self, name: str, address: str, seconds: float | None, now: float) -> bool:
        last = self.lists.get(name, {}).get(address)
        return last is not None and (seconds is None or now - last <= seconds)

    def record(self, name: str, address: str, now: float) -> None:
        self.lists.setdefault(name, {})[address] = now

    def copy(self) -> RecentState:
        return RecentState({name: dict(entries) for name, entries in self.lists.items()})


@dataclass(frozen=True, slots=True)
class TraceResult:
    verdict: Verdict
    dnat: tuple[str, int] | None  # the new destination, when a DNAT rule ran
    masqueraded: bool  # source NAT (MASQUERADE/SNAT) in nat POSTROUTING
    visited: tuple[tuple[str, str, int], ...]  # (table, chain, index) of every rule that matched
    mark: int  # the packet mark at the end
    # (table, chain, index, why) of every rule `lenient` passed without evaluating it.
    skipped: tuple[tuple[str, str, int, str], ...] = ()
    redirected: bool = False  # the DNAT was a REDIRECT to the node itself


class TraceOptions(TypedDict, total=False):
    local_addresses: Iterable[str]  # the node's own addresses (addrtype LOCAL, routing to INPUT)
    recent: RecentState  # xt_recent lists; trace_packet updates it in place
    now: float  # seconds, for recent --seconds
    policies: Mapping[tuple[str, str], str]  # (table, built-in chain) -> "ACCEPT" | "DROP"
    lenient: bool  # record rules using unknown extensions in `skipped` instead of raising


@dataclass
class _State:
    """The packet as it moves through the tables, and what the tracer was given."""

    ruleset: Ruleset
    packet: Packet
    local: frozenset[str]
    choose: Choose
    recent: RecentState
    now: float
    lenient: bool = False
    dnat: tuple[str, int] | None = None
    redirected: bool = False
    masqueraded: bool = False
    visited: list[tuple[str, str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str, int, str]] = field(default_factory=list)


def seeded_choice(seed: int = 0) -> Choose:
    """A `choose` that takes a probability match as the kernel does, from a seeded generator."""
    rng = random.Random(seed)
    return lambda probability: rng.random() < probability


def trace_packet(
    ruleset: Ruleset,
    packet: Packet,
    hook: Hook,
    *,
    choose: Choose | None = None,
    **options: Unpack[TraceOptions],
) -> TraceResult:
    """Follow one NEW packet through the ruleset (built-in policies default to ACCEPT)."""
    state = _State(
        ruleset=ruleset,
        packet=replace(packet, src=_canonical(packet.src), dst=_canonical(packet.dst)),
        local=frozenset(_canonical(a) for a in options.get("local_addresses", ())),
        choose=choose or seeded_choice(),
        recent=options.get("recent", RecentState()),
        now=options.get("now", 0.0),
        lenient=options.get("lenient", False),
    )
    flow = _run_path(state, hook, options.get("policies", {}))
    verdict = _VERDICTS.get(flow, Verdict.ACCEPTED)
    return TraceResult(
        verdict,
        state.dnat,
        state.masqueraded,
        tuple(state.visited),
        state.packet.mark,
        tuple(state.skipped),
        state.redirected,
    )


def _canonical(address: str) -> str:
    return str(ipaddress.ip_address(address))


def _run_path(state: _State, hook: Hook, policies: Mapping[tuple[str, str], str]) -> _Flow:
    if hook not in ("PREROUTING", "OUTPUT"):
        raise TraceError(f"unknown hook {hook!r}: use PREROUTING or OUTPUT")

    def run(table: str, chain: str) -> _Flow:
        return _run_builtin(state, table, chain, policies.get((table, chain), "ACCEPT"))

    flow = run("nat", hook)
    if flow in (_Flow.DROP, _Flow.REJECT):
        return flow
    if hook == "PREROUTING" and (state.redirected or state.packet.dst in state.local):
        return run("filter", "INPUT")  # routed to the node itself: not forwarded
    flow = run("filter", "FORWARD" if hook == "PREROUTING" else "OUTPUT")
    if flow in (_Flow.DROP, _Flow.REJECT):
        return flow
    return run("nat", "POSTROUTING")


def _run_builtin(state: _State, table_name: str, chain: str, policy: str) -> _Flow:
    table = state.ruleset.table(table_name) or Table(table_name)
    rules = [j.rule for j in reversed(table.jumps) if j.chain == chain]
    flow = _run_chain(state, table, chain, rules, 0)
    if flow in (_Flow.NEXT, _Flow.RETURN):
        return _Flow.DROP if policy == "DROP" else _Flow.ACCEPT
    return flow


def _run_chain(state: _State, table: Table, chain: str, rules: Sequence[Rule], depth: int) -> _Flow:
    if depth > _MAX_DEPTH:
        raise TraceError(f"chain {chain} nested deeper than {_MAX_DEPTH}: a loop?")
    for index, rule in enumerate(rules):
        try:
            if not rule_matches(state, rule):
                continue
            state.visited.append((table.name, chain, index))
            flow = _run_target(state, table, rule.target, depth)
        except UnknownExtension as exc:
            if not state.lenient:
                raise TraceError(str(exc)) from None
            state.skipped.append((table.name, chain, index, str(exc)))
            continue
        if flow is not _Flow.NEXT:
            return flow
    return _Flow.RETURN


def _run_target(state: _State, table: Table, target: Target | None, depth: int) -> _Flow:
    if target is None:
        return _Flow.NEXT
    verdicts = {"ACCEPT": _Flow.ACCEPT, "DROP": _Flow.DROP, "RETURN": _Flow.RETURN}
    if target.name in verdicts:
        return verdicts[target.name]
    chain = table.chain(target.name)
    if chain is not None:
        flow = _run_chain(state, table, chain.name, chain.rules, depth + 1)
        if flow is _Flow.RETURN:  # a goto's chain returns straight to our caller
            return _Flow.RETURN if target.goto else _Flow.NEXT
        return flow
    return _run_extension(state, target)


def _run_extension(state: _State, target: Target) -> _Flow:
    if target.name == "REJECT":
        return _Flow.REJECT
    if target.name == "MARK":
        value, mask = value_mask(opt_value(target, "set-xmark"))
        state.packet = replace(state.packet, mark=(state.packet.mark & ~mask & 0xFFFFFFFF) ^ value)
        return _Flow.NEXT
    if target.name == "DNAT":
        ip, port = _parse_destination(opt_value(target, "to-destination"), state.packet.dport)
        state.packet = replace(state.packet, dst=ip, dport=port)
        state.dnat = (ip, port)
        return _Flow.ACCEPT
    if target.name == "REDIRECT":
        to_port = int(opt_value(target, "to-ports").split("-")[0])
        loopback = "::1" if ":" in state.packet.dst else "127.0.0.1"
        state.packet = replace(state.packet, dst=loopback, dport=to_port)
        state.dnat, state.redirected = (loopback, to_port), True
        return _Flow.ACCEPT
    if target.name in ("MASQUERADE", "SNAT"):
        state.masqueraded = True
        return _Flow.ACCEPT
    raise UnknownExtension(f"the tracer does not implement target {target.name}")


def _parse_destination(text: str, dport: int) -> tuple[str, int]:
    """`10.0.0.1:80`, `[fd00::1]:80` or a bare address (keeps the port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    return str(ipaddress.ip_address(host)), int(port) if port else dport


def host_port(ip: str, port: int) -> str:
    """`ip:port`, an IPv6 address in brackets: DNAT's --to-destination and what a trace says."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _scripted(prefix: tuple[bool, ...], taken: list[tuple[bool, float]]) -> Choose:
    """A `choose` that replays `prefix` and then says no, appending every answer (with the
    probability it was asked with) to `taken`."""

    def choose(probability: float) -> bool:
        answer = prefix[len(taken)] if len(taken) < len(prefix) else False
        taken.append((answer, probability))
        return answer

    return choose


def every_path(run: Callable[[Choose], T], max_paths: int, what: str) -> list[tuple[float, T]]:
    """`run` once per way its random choices can fall, each result with its share (the shares
    sum to 1): a prefix of answers is replayed, then a yes tried at each later question. A tracer
    of any kind of table walks its branches with this."""
    results: list[tuple[float, T]] = []
    pending: list[tuple[bool, ...]] = [()]
    while pending:
        if len(results) >= max_paths:
            raise TraceError(f"more than {max_paths} paths through {what}")
        prefix, taken = pending.pop(), list[tuple[bool, float]]()
        result = run(_scripted(prefix, taken))
        share = 1.0
        for answer, probability in taken:
            share *= probability if answer else 1.0 - probability
        results.append((share, result))
        # Every decision made past the replayed prefix was a no: try a yes there too.
        answers = [answer for answer, _ in taken]
        pending.extend((*answers[:i], True) for i in range(len(prefix), len(answers)))
    return results


def weighted_outcomes(
    ruleset: Ruleset,
    packet: Packet,
    hook: Hook,
    *,
    max_paths: int = 10_000,
    **options: Unpack[TraceOptions],
) -> list[tuple[float, TraceResult]]:
    """One (share, TraceResult) per way the probability matches can fall, the shares summing
    to 1; `recent` is left unchanged."""

    def run(choose: Choose) -> TraceResult:
        run_options = TraceOptions(**options)
        run_options["recent"] = options.get("recent", RecentState()).copy()
        return trace_packet(ruleset, packet, hook, choose=choose, **run_options)

    return every_path(run, max_paths, "the ruleset")


def possible_outcomes(
    ruleset: Ruleset,
    packet: Packet,
    hook: Hook,
    *,
    max_paths: int = 10_000,
    **options: Unpack[TraceOptions],
) -> list[TraceResult]:
    """One TraceResult per way the probability matches can fall; `recent` is left unchanged."""
    return [
        result
        for _, result in weighted_outcomes(ruleset, packet, hook, max_paths=max_paths, **options)
    ]


def possible_destinations(
    ruleset: Ruleset, packet: Packet, hook: Hook, **options: Unpack[TraceOptions]
) -> set[tuple[str, int] | None]:
    """Every DNAT destination the packet can get (None: a path on which it is not DNATed)."""
    return {r.dnat for r in possible_outcomes(ruleset, packet, hook, **options)}
