"""What the nftables tracer says about a rule: each statement that held, in words, and why a
packet is masqueraded, rejected or dropped. Pure; the same wording as the x_tables tracer's
(rules/explain.py) where the meaning is the same, so both modes read alike."""

from __future__ import annotations

from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.ir import (
    CtStateNew,
    FibLocal,
    Key,
    Lookup,
    MarkClear,
    Match,
    NumgenZero,
    PortMatch,
    Rule,
    Statement,
)

_WHERE = {
    Key.SADDR: "source",
    Key.DADDR: "destination",
    Key.L4PROTO: "protocol",
    Key.DPORT: "destination port",
    Key.IIFNAME: "in-interface",
}


def describe_statement(stmt: Statement) -> str | None:
    """A condition that held, in words (None: the statement is an action, not a condition)."""
    match stmt:
        case Match(key, value, negate):
            return f"{_WHERE[key]} {'not ' if negate else ''}{value}"
        case PortMatch(proto, port):
            return f"protocol {proto}, destination port {port}"
        case CtStateNew():
            return "connection state NEW"
        case FibLocal(key):
            return f"{_WHERE[key]} is a node address (fib ... type local)"
        case MarkClear(mask):
            return f"packet mark & 0x{mask:x} is 0 (not marked for masquerade)"
        case NumgenZero(modulus):
            return f"picked at random (probability {1 / modulus:.4g})"
        case Lookup(keys, set_name):
            return f"{' . '.join(_WHERE[k] for k in keys)} in @{set_name}"
    return None


def mark_reason(chain: str, rule: Rule) -> str:
    """Why the rule that jumps to mark-for-masquerade marks the packet."""
    comment = rule.comment or ""
    matches = [s for s in rule.statements if isinstance(s, (Match, FibLocal))]
    for stmt in matches:
        if isinstance(stmt, Match) and stmt.negate and stmt.key is Key.SADDR:
            return f"its source is outside {stmt.value}, the pods' range (detectLocalMode)"
        if isinstance(stmt, Match) and stmt.negate and stmt.key is Key.IIFNAME:
            return f"it did not arrive on a pod interface ({stmt.value}; detectLocalMode)"
        if isinstance(stmt, FibLocal) and stmt.key is Key.SADDR:
            return "its source is one of the node's addresses (external traffic policy Local)"
    if chain.startswith(n.ENDPOINT_PREFIX):
        source = next((s.value for s in matches if isinstance(s, Match)), "?")
        return f"hairpin: the endpoint {source} reaches itself via the service"
    if comment.startswith("masquerade traffic for"):
        return "it came in through a node port, external IP or load-balancer IP (policy Cluster)"
    if chain.startswith(("service-", "local-")):
        return "masqueradeAll is set"
    return f"a rule in chain {chain} marks it"


def stop_reason(chain: str, rule_text: str, via_map: str | None, element: str | None) -> str:
    """What rejected or dropped the packet, for an operator."""
    where = f"{rule_text} (chain {chain})"
    if via_map in (n.NO_ENDPOINT_SERVICES, n.NO_ENDPOINT_NODEPORTS):
        if chain == n.REJECT_CHAIN:
            why = "the service has no endpoints"
        else:
            why = "the service has no local endpoints (traffic policy Local)"
        return f"@{via_map} element {element}: {why}; {where}"
    if chain == n.CLUSTER_IPS_CHECK:
        return f"a cluster IP, but no service port of it is this one; {where}"
    if chain.startswith("firewall-"):
        return f"loadBalancerSourceRanges do not allow this source; {where}"
    return where
