"""`kproxy trace` output: the verdict first (what the packet ends as, and why), then the walk of
every branch hop by hop; or the same facts as JSON for scripts."""

from __future__ import annotations

import json
from typing import Any

from kproxy.rules.explain import Branch, Explanation, Hop, Outcome

_ORIGINS = {"pod": "a pod", "outside": "outside the node", "node": "the node itself"}
_FAMILY = {4: "IPv4", 6: "IPv6"}


def _percent(share: float) -> str:
    return f"{share * 100:.1f}%"


def _header(e: Explanation) -> str:
    p = e.packet
    where = "the live tables" if e.source == "live" else "the planned rules"
    chains = "nat PREROUTING" if e.hook == "PREROUTING" else "nat OUTPUT"
    via = f" on {p.in_iface}" if p.in_iface else ""
    dst = f"[{p.dst}]:{p.dport}" if e.family == 6 else f"{p.dst}:{p.dport}"
    return (
        f"{p.protocol} {dst} from {p.src}{via} ({_ORIGINS[e.origin]}; enters {chains}), "
        f"{where} ({_FAMILY[e.family]})"
    )


def _ending(b: Branch) -> Hop | None:
    return b.hops[-1] if b.hops else None


def _why_verdict(b: Branch) -> str:
    if b.stopped_by is not None:
        return b.stopped_by
    hop = _ending(b)
    if hop is None:
        return "a built-in chain's policy"
    return hop.rule if hop.kproxy else f"another program's rule: {hop.rule}"


def _outcome_lines(e: Explanation) -> list[str]:
    main = max(e.branches, key=lambda b: b.share)
    # The nftables mode's no-endpoint maps name no service: say the address instead.
    p = e.packet
    name = e.service or (f"[{p.dst}]:{p.dport}" if e.family == 6 else f"{p.dst}:{p.dport}")
    entry = f" ({main.entry})" if main.entry else ""
    kind = main.outcome
    if kind is Outcome.DNAT:
        dests = e.destinations()
        if len(dests) == 1:
            lines = [f"{name}{entry}: DNATed to {dests[0][0]}"]
        else:
            lines = [f"{name}{entry}: DNATed to one of {len(dests)} endpoints:"]
            lines += [f"  {_percent(share):>6}  {dest}" for dest, share in dests]
        if e.affinity_seconds is not None:
            lines.append(
                f"session affinity (ClientIP, {e.affinity_seconds} s): a client that connected "
                "within that time goes back to its endpoint; the shares are for a new client"
            )
        return lines
    if kind is Outcome.RELAYED:
        return [f"{name}{entry}: {_relay_text(main)}"]
    if kind is Outcome.REJECTED:
        return [f"{name}: rejected (the client gets ICMP port unreachable) by {_why_verdict(main)}"]
    if kind is Outcome.DROPPED:
        return [f"{e.service or 'the packet'}: dropped by {_why_verdict(main)}"]
    if kind is Outcome.ACCEPTED:
        return [f"{name}: accepted without NAT by {_why_verdict(main)}"]
    return ["not a Service: no rule of kproxy's acted on it"]


def _relay_text(b: Branch) -> str:
    port = (b.destination or ":0").rsplit(":", 1)[1]
    where = f"port {port}" if port != "0" else "the port the agent binds (none in a plan)"
    text = f"relayed by kproxy's userspace listener on {where}, which picks among "
    if b.relay is None:
        return text + "the service's ready endpoints (round robin)"
    if not b.relay.endpoints:
        return text + "no endpoints: the connection is reset (UDP: refused)"
    text += f"endpoints {', '.join(b.relay.endpoints)} (round robin"
    if b.relay.affinity_seconds is not None:
        text += f", ClientIP affinity {b.relay.affinity_seconds} s"
    return text + ")"


def _masquerade_lines(e: Explanation) -> list[str]:
    nat = [b for b in e.branches if b.outcome in (Outcome.DNAT, Outcome.RELAYED, Outcome.UNTOUCHED)]
    if not nat:
        return []
    reasons = sorted({b.masquerade_reason for b in nat if b.masqueraded and b.masquerade_reason})
    if all(b.masqueraded for b in nat):
        return [f"masqueraded (the server sees the node's address): {r}" for r in reasons]
    if not any(b.masqueraded for b in nat):
        if nat[0].outcome is Outcome.RELAYED:
            return ["the relay connects from the node: the endpoint sees the node's address"]
        if nat[0].outcome is Outcome.UNTOUCHED:
            return []
        return [f"not masqueraded: the endpoint sees the source {e.packet.src}"]
    lines = []
    for b in nat:
        state = f"masqueraded: {b.masquerade_reason}" if b.masqueraded else "not masqueraded"
        lines.append(f"to {b.destination}: {state}")
    return lines


def _hop_lines(number: int, hop: Hop) -> list[str]:
    owner = "" if hop.kproxy else " [not kproxy's]"
    return [
        f"  {number:>2}. {hop.table} {hop.chain}{owner}: {hop.rule}",
        f"      matched: {', '.join(hop.why)}",
    ]


def _common_prefix(a: tuple[Hop, ...], b: tuple[Hop, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _walk_lines(e: Explanation) -> list[str]:
    lines: list[str] = []
    first = e.branches[0].hops
    total = len(e.branches)
    for i, b in enumerate(e.branches, start=1):
        to = f" -> {b.destination}" if b.destination else f": {b.outcome.value}"
        head = f"walk{to}" if total == 1 else f"branch {i} of {total} ({_percent(b.share)}){to}"
        lines.append(head)
        shared = _common_prefix(first, b.hops) if i > 1 else 0
        if shared:
            lines.append(f"  {1:>2}-{shared}. as in branch 1")
        for n, hop in enumerate(b.hops[shared:], start=shared + 1):
            lines.extend(_hop_lines(n, hop))
        if not b.hops:
            lines.append("  no rule matched")
    return lines


def render_trace(e: Explanation) -> str:
    lines = [_header(e), *e.notes, *_outcome_lines(e), *_masquerade_lines(e)]
    foreign = e.foreign_rules()
    if foreign:
        lines.append("rules of other programs it passed:")
        lines += [f"  {rule}" for rule in foreign]
    elif e.outcome is Outcome.UNTOUCHED and e.source == "live":
        lines.append("no rule of another program matched it either")
    skipped = sorted({s for b in e.branches for s in b.skipped})
    if skipped:
        lines.append("rules passed without being evaluated (the tracer cannot):")
        lines += [f"  {rule}" for rule in skipped]
    if e.unreadable:
        lines.append("lines of the tables the tracer cannot read (never evaluated):")
        lines += [f"  {line}" for line in e.unreadable]
    lines.append("")
    lines += _walk_lines(e)
    return "\n".join(lines) + "\n"


def _branch_json(b: Branch) -> dict[str, Any]:
    relay = None
    if b.relay is not None:
        relay = {"endpoints": list(b.relay.endpoints), "affinitySeconds": b.relay.affinity_seconds}
    return {
        "share": b.share,
        "outcome": b.outcome.value,
        "service": b.service,
        "entry": b.entry,
        "destination": b.destination,
        "masqueraded": b.masqueraded,
        "masqueradeReason": b.masquerade_reason,
        "relay": relay,
        "stoppedBy": b.stopped_by,
        "hops": [
            {
                "table": h.table,
                "chain": h.chain,
                "rule": h.rule,
                "why": list(h.why),
                "kproxy": h.kproxy,
            }
            for h in b.hops
        ],
        "notEvaluated": list(b.skipped),
    }


def _masqueraded(e: Explanation) -> bool | str:
    """True or False when every branch agrees, else "some" (see each branch)."""
    states = {b.masqueraded for b in e.branches}
    return states.pop() if len(states) == 1 else "some"


def trace_json(e: Explanation) -> dict[str, Any]:
    p = e.packet
    return {
        "packet": {
            "protocol": p.protocol,
            "source": p.src,
            "destination": p.dst,
            "port": p.dport,
            "inInterface": p.in_iface,
        },
        "family": e.family,
        "origin": e.origin,
        "hook": e.hook,
        "tables": e.source,
        "outcome": e.outcome.value,
        "service": e.service,
        "destinations": [{"destination": d, "share": s} for d, s in e.destinations()],
        "affinitySeconds": e.affinity_seconds,
        "masqueraded": _masqueraded(e),
        "foreignRules": e.foreign_rules(),
        "unreadable": list(e.unreadable),
        "notes": list(e.notes),
        "branches": [_branch_json(b) for b in e.branches],
    }


def render_output(explanation: Explanation, output: str) -> str:
    """`--output json` or the text."""
    if output == "json":
        return json.dumps(trace_json(explanation), indent=2) + "\n"
    return render_trace(explanation)
