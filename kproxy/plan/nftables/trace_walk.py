"""The nftables tracer's walk (see trace.py): one packet through the `kube-proxy` table's base
chains, hook by hook and by priority, following jump/goto/return, verdict maps and sets, once
per way the `numgen` branches can fall."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kproxy.plan.nftables import ir
from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.render import render_element, render_rule, render_verdict
from kproxy.plan.nftables.trace_words import (
    describe_statement,
    mark_reason,
    stop_reason,
)
from kproxy.rules.explain import Hop
from kproxy.rules.trace import Hook, Packet, TraceError, every_path

_MAX_DEPTH = 64
_MAX_PATHS = 10_000


class Flow(enum.Enum):
    """What evaluating a chain (or a rule's verdict) leads to."""

    NEXT = "next"
    RETURN = "return"
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"


def canonical(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def _covers(pattern: str, value: str) -> bool:
    if "/" not in pattern:
        return pattern == value
    try:
        return ipaddress.ip_address(value) in ipaddress.ip_network(pattern, strict=False)
    except ValueError:
        return False


class TableIndex:
    """The table as the walk looks things up in it: chains by name, elements by key, base
    chains by hook in priority order."""

    def __init__(self, table: ir.NftTable) -> None:
        self.table = table
        self._chains = {c.name: c for c in table.chains}
        self._elements = {
            name: {tuple(canonical(p) for p in e.key): e for e in elements}
            for name, elements in table.elements.items()
        }

    def chain(self, name: str) -> ir.Chain:
        found = self._chains.get(name)
        if found is None:
            raise TraceError(f"the table has no chain {name}")
        return found

    def element(self, named: ir.NamedSet, key: tuple[str, ...]) -> ir.Element | None:
        elements = self._elements.get(named.name, {})
        if "interval" not in named.flags:
            return elements.get(key)
        for candidate, element in elements.items():
            if len(candidate) == len(key) and all(map(_covers, candidate, key)):
                return element
        return None

    def base_chains(self, hook: str) -> list[ir.Chain]:
        hooked = [c for c in self.table.chains if c.hook is not None and c.hook.hook == hook]
        return sorted(hooked, key=lambda c: c.hook.priority if c.hook else 0)


@dataclass
class Walk:
    """One walk of the table: the packet as it goes, and what was seen on the way."""

    tables: TableIndex
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
    hits: list[tuple[str, ir.Element]] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.tables.table.nft_family

    def key_value(self, key: ir.Key) -> str:
        p = self.packet
        values = {
            ir.Key.SADDR: p.src,
            ir.Key.DADDR: p.dst,
            ir.Key.L4PROTO: p.protocol,
            ir.Key.DPORT: str(p.dport),
            ir.Key.IIFNAME: p.in_iface or "",
        }
        return values[key]


def _address_in(address: str, value: str) -> bool:
    if "/" not in value:
        return address == canonical(value)
    net = ipaddress.ip_network(value, strict=False)
    ip = ipaddress.ip_address(address)
    return ip.version == net.version and ip in net


def _iface_is(iface: str, pattern: str) -> bool:
    return iface.startswith(pattern[:-1]) if pattern.endswith("+") else iface == pattern


def _holds(w: Walk, stmt: ir.Statement) -> bool | None:
    """Whether a condition holds (None: the statement is an action)."""
    p = w.packet
    match stmt:
        case ir.Match(key, value, negate):
            if key in (ir.Key.SADDR, ir.Key.DADDR):
                hit = _address_in(w.key_value(key), value)
            elif key is ir.Key.IIFNAME:
                hit = _iface_is(w.key_value(key), value)
            else:
                hit = w.key_value(key) == value
            return hit != negate
        case ir.PortMatch(proto, port):
            return p.protocol == proto and p.dport == port
        case ir.CtStateNew():
            return True  # the tracer follows the first packet of a connection
        case ir.FibLocal(key):
            return w.key_value(key) in w.local
        case ir.MarkClear(mask):
            return p.mark & mask == 0
        case ir.NumgenZero(modulus):
            return modulus <= 1 or w.choose(1 / modulus)
        case ir.Lookup(keys, set_name):
            return _lookup(w, keys, set_name)
    return None


def _named(w: Walk, name: str) -> ir.NamedSet:
    found = w.tables.table.named_set(name)
    if found is None:
        raise TraceError(f"the table has no set or map {name}")
    return found


def _lookup(w: Walk, keys: tuple[ir.Key, ...], set_name: str) -> bool:
    named = _named(w, set_name)
    if named.dynamic:  # an affinity set: a new client is in none of them
        if named.timeout is not None and w.affinity is None:
            w.affinity = named.timeout
        return False
    return w.tables.element(named, tuple(w.key_value(k) for k in keys)) is not None


def _run_chain(w: Walk, name: str, depth: int) -> Flow:
    if depth > _MAX_DEPTH:
        raise TraceError(f"chain {name} nested deeper than {_MAX_DEPTH}: a loop?")
    chain = w.tables.chain(name)
    for rule in chain.rules:
        flow = _run_rule(w, chain, rule, depth)
        if flow is not Flow.NEXT:
            return flow
    return Flow.RETURN


def _run_rule(w: Walk, chain: ir.Chain, rule: ir.Rule, depth: int) -> Flow:
    why: list[str] = []
    hopped = False

    def hop() -> None:
        actions = [
            f"remembers the client in @{s.set_name}"
            for s in rule.statements
            if isinstance(s, ir.Update)
        ]
        text = render_rule(rule, w.family)
        w.hops.append(
            Hop(n.TABLE, chain.name, text, tuple(why + actions) or ("every packet",), True)
        )

    for stmt in rule.statements:
        if isinstance(stmt, ir.Vmap):
            named = _named(w, stmt.map_name)
            key = tuple(w.key_value(k) for k in stmt.keys)
            element = w.tables.element(named, key)
            if element is None or element.verdict is None:
                return Flow.NEXT
            why.append(f"{' . '.join(key)} in @{stmt.map_name}: {render_verdict(element.verdict)}")
            w.hits.append((stmt.map_name, element))
            hop()
            return _run_verdict(w, chain, rule, element.verdict, depth)
        held = _holds(w, stmt)
        if held is False:
            return Flow.NEXT
        if held:
            why.append(describe_statement(stmt) or "")
            continue
        if not hopped:
            hop()
            hopped = True
        flow = _act(w, chain, rule, stmt, depth)
        if flow is not Flow.NEXT:
            return flow
    if not hopped:
        hop()
    return Flow.NEXT


def _act(w: Walk, chain: ir.Chain, rule: ir.Rule, stmt: ir.Statement, depth: int) -> Flow:
    p = w.packet
    match stmt:
        case ir.Verdict():
            return _run_verdict(w, chain, rule, stmt, depth)
        case ir.MarkSet(op, value):
            mark = p.mark | value if op == "|" else p.mark ^ value
            w.packet = replace(p, mark=mark & 0xFFFFFFFF)
            return Flow.NEXT
        case ir.Update():
            return Flow.NEXT
        case ir.Dnat(ip, port):
            w.packet = replace(p, dst=canonical(ip), dport=port)
            w.dnat = (canonical(ip), port)
            return Flow.ACCEPT
        case ir.Masquerade():
            w.masqueraded = True
            return Flow.ACCEPT
        case ir.Reject():
            _stop(w, chain, rule)
            return Flow.REJECT
    raise TraceError(f"the tracer does not implement {stmt!r}")


def _stop(w: Walk, chain: ir.Chain, rule: ir.Rule) -> None:
    via, element = (w.hits[-1][0], render_element(w.hits[-1][1])) if w.hits else (None, None)
    w.stopped_by = stop_reason(chain.name, render_rule(rule, w.family), via, element)


def _run_verdict(w: Walk, chain: ir.Chain, rule: ir.Rule, v: ir.Verdict, depth: int) -> Flow:
    if v.kind == "accept":
        return Flow.ACCEPT
    if v.kind == "drop":
        _stop(w, chain, rule)
        return Flow.DROP
    if v.kind == "return":
        return Flow.RETURN
    if v.chain is None or v.kind not in ("jump", "goto"):
        raise TraceError(f"the tracer does not implement verdict {render_verdict(v)}")
    if v.chain == n.MARK_FOR_MASQUERADE and w.masquerade_reason is None:
        w.masquerade_reason = mark_reason(chain.name, rule)
    flow = _run_chain(w, v.chain, depth + 1)
    if flow is Flow.RETURN:  # a goto's chain returns straight to our caller
        return Flow.RETURN if v.kind == "goto" else Flow.NEXT
    return flow


def _run_hook(w: Walk, hook: str) -> Flow:
    for chain in w.tables.base_chains(hook):
        flow = _run_chain(w, chain.name, 0)
        if flow in (Flow.DROP, Flow.REJECT):
            return flow
    return Flow.ACCEPT


def _run_path(w: Walk, hook: Hook) -> Flow:
    if hook == "PREROUTING":
        flow = _run_hook(w, "prerouting")
        if flow is not Flow.ACCEPT:
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
        if flow is not Flow.ACCEPT:
            return flow
    if hook == "OUTPUT" and w.packet.dst in w.local:
        return _run_hook(w, "input")  # over loopback to the node itself
    return Flow.ACCEPT


def walk_all(
    tables: TableIndex, packet: Packet, hook: Hook, local: frozenset[str]
) -> list[tuple[float, Walk, Flow]]:
    """Every way the numgen branches can fall, each with its share."""

    def run(choose: Callable[[float], bool]) -> tuple[Walk, Flow]:
        w = Walk(tables, packet, local, choose)
        return w, _run_path(w, hook)

    return [(share, w, flow) for share, (w, flow) in every_path(run, _MAX_PATHS, "the table")]
