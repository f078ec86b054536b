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

import enum
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property

from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.ir import (
    Chain,
    CtStateNew,
    Dnat,
    Element,
    FibLocal,
    Key,
    Lookup,
    MarkClear,
    MarkSet,
    Masquerade,
    Match,
    NamedSet,
    NftTable,
    NumgenZero,
    PortMatch,
    Reject,
    Rule,
    Statement,
    Update,
    Verdict,
    Vmap,
)
from kproxy.plan.nftables.render import render_element, render_rule
from kproxy.plan.nftables.trace_words import (
    describe_statement,
    mark_reason,
    stop_reason,
    verdict_text,
)
from kproxy.rules.explain import Branch, Explanation, Hop, Outcome
from kproxy.rules.trace import Hook, Packet, TraceError

_MAX_DEPTH = 64
_MAX_PATHS = 10_000
_SERVICE_MAPS = (n.SERVICE_IPS, n.SERVICE_NODEPORTS, n.FIREWALL_IPS)
_PORT_CHAIN_PREFIXES = ("service-", "local-", "external-", "firewall-")


class _Flow(enum.Enum):
    NEXT = "next"
    RETURN = "return"
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"


def _canonical(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


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
            _canonical(s.ip)
            for chain in self.table.chains
            for rule in chain.rules
            for s in rule.statements
            if isinstance(s, Dnat)
        }

    @cached_property
    def _index(self) -> dict[str, dict[tuple[str, ...], Element]]:
        return {
            name: {tuple(_canonical(p) for p in e.key): e for e in elements}
            for name, elements in self.table.elements.items()
        }

    @cached_property
    def _chains(self) -> dict[str, Chain]:
        return {c.name: c for c in self.table.chains}

    def chain(self, name: str) -> Chain:
        found = self._chains.get(name)
        if found is None:
            raise TraceError(f"the table has no chain {name}")
        return found

    def element(self, named: NamedSet, key: tuple[str, ...]) -> Element | None:
        elements = self._index.get(named.name, {})
        if "interval" not in named.flags:
            return elements.get(key)
        for candidate, element in elements.items():
            if len(candidate) == len(key) and all(map(_covers, candidate, key)):
                return element
        return None

    def base_chains(self, hook: str) -> list[Chain]:
        hooked = [c for c in self.table.chains if c.hook is not None and c.hook.hook == hook]
        return sorted(hooked, key=lambda c: c.hook.priority if c.hook else 0)


def _covers(pattern: str, value: str) -> bool:
    if "/" not in pattern:
        return pattern == value
    try:
        return ipaddress.ip_address(value) in ipaddress.ip_network(pattern, strict=False)
    except ValueError:
        return False


@dataclass
class _Walk:
    """One walk of the table: the packet as it goes, and what was seen on the way."""

    tables: NftTraceTables
    packet: Packet
    local: frozenset[str]
    choose: Callable[[float], bool]
    dnat: tuple[str, int] | None = None
    masqueraded: bool = False
    masquerade_reason: str | None = None
    affinity: int | None = None
    stopped_by: str | None = None
    hops: list[Hop] = field(default_factory=list)
    # Verdict-map hits: (map, element as listed), the last one decides a stop's reason.
    hits: list[tuple[str, Element]] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.tables.table.nft_family

    def key_value(self, key: Key) -> str:
        p = self.packet
        values = {
            Key.SADDR: p.src,
            Key.DADDR: p.dst,
            Key.L4PROTO: p.protocol,
            Key.DPORT: str(p.dport),
            Key.IIFNAME: p.in_iface or "",
        }
        return values[key]


def _address_in(address: str, value: str) -> bool:
    if "/" not in value:
        return address == _canonical(value)
    net = ipaddress.ip_network(value, strict=False)
    ip = ipaddress.ip_address(address)
    return ip.version == net.version and ip in net


def _iface_is(iface: str, pattern: str) -> bool:
    return iface.startswith(pattern[:-1]) if pattern.endswith("+") else iface == pattern


def _holds(w: _Walk, stmt: Statement) -> bool | None:
    """Whether a condition holds (None: the statement is an action)."""
    p = w.packet
    match stmt:
        case Match(key, value, negate):
            if key in (Key.SADDR, Key.DADDR):
                hit = _address_in(w.key_value(key), value)
            elif key is Key.IIFNAME:
                hit = _iface_is(w.key_value(key), value)
            else:
                hit = w.key_value(key) == value
            return hit != negate
        case PortMatch(proto, port):
            return p.protocol == proto and p.dport == port
        case CtStateNew():
            return True  # the tracer follows the first packet of a connection
        case FibLocal(key):
            return w.key_value(key) in w.local
        case MarkClear(mask):
            return p.mark & mask == 0
        case NumgenZero(modulus):
            return modulus <= 1 or w.choose(1 / modulus)
        case Lookup(keys, set_name):
            return _lookup(w, keys, set_name)
    return None


def _named(w: _Walk, name: str) -> NamedSet:
    found = w.tables.table.named_set(name)
    if found is None:
        raise TraceError(f"the table has no set or map {name}")
    return found


def _lookup(w: _Walk, keys: tuple[Key, ...], set_name: str) -> bool:
    named = _named(w, set_name)
    if named.dynamic:  # an affinity set: a new client is in none of them
        if named.timeout is not None and w.affinity is None:
            w.affinity = named.timeout
        return False
    return w.tables.element(named, tuple(w.key_value(k) for k in keys)) is not None


def _run_chain(w: _Walk, name: str, depth: int) -> _Flow:
    if depth > _MAX_DEPTH:
        raise TraceError(f"chain {name} nested deeper than {_MAX_DEPTH}: a loop?")
    chain = w.tables.chain(name)
    for rule in chain.rules:
        flow = _run_rule(w, chain, rule, depth)
        if flow is not _Flow.NEXT:
            return flow
    return _Flow.RETURN


def _run_rule(w: _Walk, chain: Chain, rule: Rule, depth: int) -> _Flow:
    why: list[str] = []
    hopped = False

    def hop() -> None:
        actions = [
            f"remembers the client in @{s.set_name}"
            for s in rule.statements
            if isinstance(s, Update)
        ]
        text = render_rule(rule, w.family)
        w.hops.append(
            Hop(n.TABLE, chain.name, text, tuple(why + actions) or ("every packet",), True)
        )

    for stmt in rule.statements:
        if isinstance(stmt, Vmap):
            named = _named(w, stmt.map_name)
            key = tuple(w.key_value(k) for k in stmt.keys)
            element = w.tables.element(named, key)
            if element is None or element.verdict is None:
                return _Flow.NEXT
            why.append(f"{' . '.join(key)} in @{stmt.map_name}: {verdict_text(element.verdict)}")
            w.hits.append((stmt.map_name, element))
            hop()
            return _run_verdict(w, chain, rule, element.verdict, depth)
        held = _holds(w, stmt)
        if held is False:
            return _Flow.NEXT
        if held:
            why.append(describe_statement(stmt) or "")
            continue
        if not hopped:
            hop()
            hopped = True
        flow = _act(w, chain, rule, stmt, depth)
        if flow is not _Flow.NEXT:
            return flow
    if not hopped:
        hop()
    return _Flow.NEXT


def _act(w: _Walk, chain: Chain, rule: Rule, stmt: Statement, depth: int) -> _Flow:
    p = w.packet
    match stmt:
        case Verdict():
            return _run_verdict(w, chain, rule, stmt, depth)
        case MarkSet(op, value):
            mark = p.mark | value if op == "|" else p.mark ^ value
            w.packet = replace(p, mark=mark & 0xFFFFFFFF)
            return _Flow.NEXT
        case Update():
            return _Flow.NEXT
        case Dnat(ip, port):
            w.packet = replace(p, dst=_canonical(ip), dport=port)
            w.dnat = (_canonical(ip), port)
            return _Flow.ACCEPT
        case Masquerade():
            w.masqueraded = True
            return _Flow.ACCEPT
        case Reject():
            _stop(w, chain, rule)
            return _Flow.REJECT
    raise TraceError(f"the tracer does not implement {stmt!r}")


def _stop(w: _Walk, chain: Chain, rule: Rule) -> None:
    via, element = (w.hits[-1][0], render_element(w.hits[-1][1])) if w.hits else (None, None)
    w.stopped_by = stop_reason(chain.name, render_rule(rule, w.family), via, element)


def _run_verdict(w: _Walk, chain: Chain, rule: Rule, v: Verdict, depth: int) -> _Flow:
    if v.kind == "accept":
        return _Flow.ACCEPT
    if v.kind == "drop":
        _stop(w, chain, rule)
        return _Flow.DROP
    if v.kind == "return":
        return _Flow.RETURN
    if v.chain is None or v.kind not in ("jump", "goto"):
        raise TraceError(f"the tracer does not implement verdict {verdict_text(v)}")
    if v.chain == n.MARK_FOR_MASQUERADE and w.masquerade_reason is None:
        w.masquerade_reason = mark_reason(chain.name, rule)
    flow = _run_chain(w, v.chain, depth + 1)
    if flow is _Flow.RETURN:  # a goto's chain returns straight to our caller
        return _Flow.RETURN if v.kind == "goto" else _Flow.NEXT
    return flow


def _run_hook(w: _Walk, hook: str) -> _Flow:
    for chain in w.tables.base_chains(hook):
        flow = _run_chain(w, chain.name, 0)
        if flow in (_Flow.DROP, _Flow.REJECT):
            return flow
    return _Flow.ACCEPT


def _run_path(w: _Walk, hook: Hook) -> _Flow:
    if hook == "PREROUTING":
        flow = _run_hook(w, "prerouting")
        if flow is not _Flow.ACCEPT:
            return flow
        if w.packet.dst in w.local:
            return _run_hook(w, "input")
        path = ("forward", "postrouting")
    elif hook == "OUTPUT":
        path = ("output", "postrouting")
    else:
        raise TraceError(f"unknown hook {hook!r}: use PREROUTING or OUTPUT")
    for name in path:
        flow = _run_hook(w, name)
        if flow is not _Flow.ACCEPT:
            return flow
    if hook == "OUTPUT" and w.packet.dst in w.local:
        return _run_hook(w, "input")  # over loopback to the node itself
    return _Flow.ACCEPT


def _scripted(prefix: tuple[bool, ...], taken: list[tuple[bool, float]]) -> Callable[[float], bool]:
    """Answers `prefix`, then no; every answer (and its probability) goes to `taken`."""

    def choose(probability: float) -> bool:
        answer = prefix[len(taken)] if len(taken) < len(prefix) else False
        taken.append((answer, probability))
        return answer

    return choose


def _walks(
    tables: NftTraceTables, packet: Packet, hook: Hook, local: frozenset[str]
) -> list[tuple[float, _Walk, _Flow]]:
    """Every way the numgen branches can fall, each with its share (replaying a prefix of
    answers and trying a yes at each later question)."""
    out: list[tuple[float, _Walk, _Flow]] = []
    pending: list[tuple[bool, ...]] = [()]
    while pending:
        if len(out) >= _MAX_PATHS:
            raise TraceError(f"more than {_MAX_PATHS} paths through the table")
        prefix, taken = pending.pop(), list[tuple[bool, float]]()
        w = _Walk(tables, packet, local, _scripted(prefix, taken))
        flow = _run_path(w, hook)
        share = 1.0
        for answer, probability in taken:
            share *= probability if answer else 1.0 - probability
        out.append((share, w, flow))
        answers = [answer for answer, _ in taken]
        pending.extend((*answers[:i], True) for i in range(len(prefix), len(answers)))
    return out


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


def _entry(w: _Walk) -> tuple[str | None, str | None]:
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


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _branch(share: float, w: _Walk, flow: _Flow) -> Branch:
    service, entry = _entry(w)
    if flow is _Flow.REJECT:
        outcome = Outcome.REJECTED
    elif flow is _Flow.DROP:
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
        destination=_host_port(*w.dnat) if w.dnat else None,
        masqueraded=w.masqueraded,
        masquerade_reason=reason,
        service=service,
        entry=entry,
        stopped_by=w.stopped_by if flow in (_Flow.DROP, _Flow.REJECT) else None,
    )


def explain_nft_packet(
    tables: NftTraceTables,
    packet: Packet,
    hook: Hook,
    origin: str,
    local_addresses: Iterable[str],
) -> Explanation:
    """Every way `packet` (the first of a NEW connection) can go through the table."""
    local = frozenset(_canonical(a) for a in local_addresses)
    packet = replace(packet, src=_canonical(packet.src), dst=_canonical(packet.dst))
    walks = _walks(tables, packet, hook, local)
    branches = sorted(
        (_branch(share, w, flow) for share, w, flow in walks),
        key=lambda b: (-b.share, b.destination or ""),
    )
    return Explanation(
        packet=packet,
        hook=hook,
        origin=origin,
        family=tables.table.family,
        source=tables.source,
        branches=tuple(branches),
        affinity_seconds=next((w.affinity for _, w, _ in walks if w.affinity), None),
        unreadable=tables.unreadable,
        notes=tables.notes,
    )
