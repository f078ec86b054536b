"""Constructors for the rule pieces kproxy writes, each already in the canonical form the kernel
reports back, so a planned rule and the same rule read from the kernel compare equal."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from kproxy.model.addresses import ip_family
from kproxy.rules.ir import Match, Opt, Target

# libxt_statistic keeps a probability as a 31-bit fraction and prints it with 11 decimals.
STATISTIC_SCALE = 0x80000000


def cidr(address: str) -> str:
    """`10.0.0.1` -> `10.0.0.1/32`; CIDRs are normalised to their network address. Addresses
    arrive normalised from the model, so the common case needs no parsing."""
    if "/" not in address:
        return address + ("/128" if ip_family(address) == 6 else "/32")
    return _network(address)


@lru_cache(maxsize=4096)
def _network(value: str) -> str:
    return str(ipaddress.ip_network(value, strict=False))


def comment(text: str) -> Match:
    # The kernel keeps at most 255 bytes of a comment.
    return Match("comment", (Opt("comment", text.encode()[:255].decode(errors="ignore")),))


@lru_cache(maxsize=4096)  # shared: Matches are immutable, and most rules of a kind hold the same
def protocol_match(protocol: str, dport: int | None = None) -> Match:
    """`-m tcp [--dport N]`; the rule itself must carry `-p tcp`."""
    return Match(protocol, (Opt("dport", str(dport)),) if dport is not None else ())


@lru_cache(maxsize=1024)
def probability(n: int) -> str:
    """The probability of picking the first of n remaining endpoints: upstream writes 1/n with 10
    decimals; this is that value as the kernel stores and prints it."""
    written = float(f"{1.0 / n:0.10f}")
    stored = int(written * STATISTIC_SCALE + 0.5)
    return f"{stored / STATISTIC_SCALE:.11f}"


@lru_cache(maxsize=1024)
def statistic(n: int) -> Match:
    return Match("statistic", (Opt("mode", "random"), Opt("probability", probability(n))))


@lru_cache(maxsize=1024)
def statistic_matches(n: int) -> tuple[Match, ...]:
    """(statistic(n),): the matches of a balancing rule without a comment, one tuple for all."""
    return (statistic(n),)


def addrtype(dst_type: str | None = None, src_type: str | None = None) -> Match:
    opts = []
    if src_type:
        opts.append(Opt("src-type", src_type))
    if dst_type:
        opts.append(Opt("dst-type", dst_type))
    return Match("addrtype", tuple(opts))


def ctstate(states: str, invert: bool = False) -> Match:
    return Match("conntrack", (Opt("ctstate", states, invert),))


def mark(value_mask: str, invert: bool = False) -> Match:
    return Match("mark", (Opt("mark", value_mask, invert),))


def recent_check(name: str, seconds: int, family: int = 4) -> Match:
    return Match(
        "recent",
        (
            Opt("rcheck"),
            Opt("seconds", str(seconds)),
            Opt("reap"),
            Opt("name", name),
            Opt("mask", _full_mask(family)),
            Opt("rsource"),
        ),
    )


def recent_set(name: str, family: int = 4) -> Match:
    return Match(
        "recent", (Opt("set"), Opt("name", name), Opt("mask", _full_mask(family)), Opt("rsource"))
    )


def _full_mask(family: int) -> str:
    return "255.255.255.255" if family == 4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


@lru_cache(maxsize=4096)  # shared, as protocol_match: KUBE-MARK-MASQ alone is in every KUBE-SEP
def jump(chain: str) -> Target:
    return Target(chain)


def dnat(destination: str) -> Target:
    return Target("DNAT", (Opt("to-destination", destination),))


def set_mark(value: str, mask: str) -> Target:
    """MARK --or-mark V is stored as --set-xmark V/V, --xor-mark V as --set-xmark V/0x0."""
    return Target("MARK", (Opt("set-xmark", f"{value}/{mask}"),))


def reject(family: int = 4) -> Target:
    kind = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    return Target("REJECT", (Opt("reject-with", kind),))


def masquerade() -> Target:
    return Target("MASQUERADE", (Opt("random-fully"),))


ACCEPT = Target("ACCEPT")
DROP = Target("DROP")
RETURN = Target("RETURN")
