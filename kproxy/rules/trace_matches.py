"""The matches the packet tracer (rules/trace.py) evaluates, one function per `-m NAME`, over
the packet as it stands at that rule."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

from kproxy.rules.ir import Match, Opt, Rule, Target


class TraceError(ValueError):
    """The ruleset uses something the tracer cannot evaluate."""


class UnknownExtension(TraceError):
    """One rule uses an extension the tracer does not implement (skipped when lenient)."""


class PacketView(Protocol):
    @property
    def src(self) -> str: ...
    @property
    def dst(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def dport(self) -> int: ...
    @property
    def sport(self) -> int: ...
    @property
    def in_iface(self) -> str | None: ...
    @property
    def out_iface(self) -> str | None: ...
    @property
    def mark(self) -> int: ...


class RecentLists(Protocol):
    def seen(self, name: str, address: str, seconds: float | None, now: float) -> bool: ...
    def record(self, name: str, address: str, now: float) -> None: ...


class MatchState(Protocol):
    """What a match may look at (and, for recent --set, change): the tracer's state."""

    @property
    def packet(self) -> PacketView: ...
    @property
    def local(self) -> frozenset[str]: ...
    @property
    def recent(self) -> RecentLists: ...
    @property
    def now(self) -> float: ...
    @property
    def dnat(self) -> tuple[str, int] | None: ...
    @property
    def redirected(self) -> bool: ...
    def choose(self, probability: float) -> bool: ...


def opt_value(item: Target | Match, name: str) -> str:
    opt = item.get(name)
    if opt is None:
        raise UnknownExtension(f"{item.name} without --{name}")
    return opt.value


def value_mask(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return int(value, 0), int(mask or "0xffffffff", 0)


@lru_cache(maxsize=4096)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def _in_cidr(address: str, cidr: str | None, invert: bool) -> bool:
    if cidr is None:
        return True
    return (ipaddress.ip_address(address) in _network(cidr)) != invert


def _iface_ok(iface: str | None, pattern: str | None, invert: bool) -> bool:
    if pattern is None:
        return True
    name = iface or ""
    return (name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern) != invert


def rule_matches(state: MatchState, rule: Rule) -> bool:
    p = state.packet
    if rule.protocol is not None and rule.protocol not in ("all", p.protocol.lower()):
        return False
    return (
        _in_cidr(p.src, rule.src, rule.src_invert)
        and _in_cidr(p.dst, rule.dst, rule.dst_invert)
        and _iface_ok(p.in_iface, rule.in_iface, rule.in_invert)
        and _iface_ok(p.out_iface, rule.out_iface, rule.out_invert)
        # In order, stopping at the first miss: recent --set has effects.
        and all(_MATCHES.get(m.name, _unknown_match)(state, m) for m in rule.matches)
    )


def _unknown_match(state: MatchState, match: Match) -> bool:
    raise UnknownExtension(f"the tracer does not implement match {match.name}")


def _port_ok(port: int, opt: Opt | None) -> bool:
    if opt is None:
        return True
    low, _, high = opt.value.partition(":")
    hit = int(low or 0) <= port <= int(high or low or 65535)
    return hit != opt.invert


def _match_ports(state: MatchState, match: Match) -> bool:
    p = state.packet
    return (
        match.name == p.protocol.lower()
        and _port_ok(p.dport, match.get("dport"))
        and _port_ok(p.sport, match.get("sport"))
    )


def _match_statistic(state: MatchState, match: Match) -> bool:
    if opt_value(match, "mode") != "random":
        raise UnknownExtension("the tracer implements statistic --mode random only")
    probability = float(opt_value(match, "probability"))
    hit = probability >= 1.0 or (probability > 0.0 and state.choose(probability))
    return hit != any(o.invert for o in match.opts)


def _match_mark(state: MatchState, match: Match) -> bool:
    value, mask = value_mask(opt_value(match, "mark"))
    return ((state.packet.mark & mask) == value) != any(o.invert for o in match.opts)


def _match_conntrack(state: MatchState, match: Match) -> bool:
    """`-m conntrack --ctstate` and the older `-m state --state`: the packet starts a NEW
    connection, DNATed once a DNAT rule ran."""
    states = {"NEW"} | ({"DNAT"} if state.dnat and not state.redirected else set())
    for opt in match.opts:
        if opt.name not in ("ctstate", "state"):
            raise UnknownExtension(f"the tracer does not implement conntrack --{opt.name}")
        if bool(states & set(opt.value.split(","))) == opt.invert:
            return False
    return True


def _match_physdev(state: MatchState, match: Match) -> bool:
    """The tracer's packets never cross a bridge: every `--physdev-*` condition is false."""
    return all(opt.invert for opt in match.opts)


def _match_addrtype(state: MatchState, match: Match) -> bool:
    for opt in match.opts:
        if opt.name not in ("src-type", "dst-type") or opt.value != "LOCAL":
            raise UnknownExtension(
                f"the tracer implements addrtype --src/dst-type LOCAL only: {opt}"
            )
        address = state.packet.src if opt.name == "src-type" else state.packet.dst
        if (address in state.local) == opt.invert:
            return False
    return True


def _match_recent(state: MatchState, match: Match) -> bool:
    name, mask, seconds = match.get("name"), match.get("mask"), match.get("seconds")
    list_name = name.value if name else "DEFAULT"
    ip = ipaddress.ip_address(state.packet.dst if match.get("rdest") else state.packet.src)
    address = str(type(ip)(int(ip) & int(type(ip)(mask.value)))) if mask else str(ip)
    if match.get("set"):
        state.recent.record(list_name, address, state.now)
        hit = True
    elif match.get("rcheck") or match.get("update"):
        limit = float(seconds.value) if seconds else None
        hit = state.recent.seen(list_name, address, limit, state.now)
        if hit and match.get("update"):
            state.recent.record(list_name, address, state.now)
    else:
        raise UnknownExtension("the tracer implements recent --set/--rcheck/--update only")
    return hit != any(o.invert for o in match.opts)


_MATCHES: dict[str, Callable[[MatchState, Match], bool]] = {
    "comment": lambda state, match: True,
    "tcp": _match_ports,
    "udp": _match_ports,
    "sctp": _match_ports,
    "statistic": _match_statistic,
    "mark": _match_mark,
    "conntrack": _match_conntrack,
    "state": _match_conntrack,
    "physdev": _match_physdev,
    "addrtype": _match_addrtype,
    "recent": _match_recent,
}
