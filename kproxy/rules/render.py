"""Render the rule IR as `iptables-save` text, byte for byte as iptables-legacy-save prints it.

The same text serves `kproxy dump`, golden tests, logs, and the dataplane's comparison with what the
kernel holds, so a rule renders one way only.
"""

from __future__ import annotations

from collections.abc import Iterable

from kproxy.rules.ir import BUILTIN_CHAINS, Match, Opt, Rule, Ruleset, Table, Target, table_rank

_NO_QUOTE = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ESCAPED = frozenset("\"\\'")
# Options whose values iptables-save prints through its quoting helper.
QUOTED_OPTIONS = frozenset({"comment"})


def render_string(value: str) -> str:
    """Quote a value as iptables-save does: bare when it is a plain word, else in double quotes
    with `"`, `\\` and `'` escaped."""
    if value and all(ch in _NO_QUOTE for ch in value):
        return value
    escaped = "".join("\\" + ch if ch in _ESCAPED else ch for ch in value)
    return f'"{escaped}"'


def _render_opts(opts: Iterable[Opt], out: list[str]) -> None:
    for opt in opts:
        if opt.invert:
            out.append("!")
        out.append("--" + opt.name)
        if opt.value or opt.name in QUOTED_OPTIONS:
            value = render_string(opt.value) if opt.name in QUOTED_OPTIONS else opt.value
            out.append(value)


def _render_match(match: Match, out: list[str]) -> None:
    out.extend(("-m", match.name))
    _render_opts(match.opts, out)


def _render_target(target: Target, out: list[str]) -> None:
    out.extend(("-g" if target.goto else "-j", target.name))
    _render_opts(target.opts, out)


def _render_field(flag: str, value: str | None, invert: bool, out: list[str]) -> None:
    if value is None:
        return
    if invert:
        out.append("!")
    out.extend((flag, value))


def render_rule(chain: str, rule: Rule) -> str:
    """One `-A CHAIN ...` line."""
    out = ["-A", chain]
    _render_field("-s", rule.src, rule.src_invert, out)
    _render_field("-d", rule.dst, rule.dst_invert, out)
    _render_field("-i", rule.in_iface, rule.in_invert, out)
    _render_field("-o", rule.out_iface, rule.out_invert, out)
    _render_field("-p", rule.protocol, rule.protocol_invert, out)
    for match in rule.matches:
        _render_match(match, out)
    if rule.target is not None:
        _render_target(rule.target, out)
    return " ".join(out)


def render_table(table: Table) -> str:
    """A table as iptables-save prints it once applied to a node: chain declarations sorted by
    name, then the jump rules in built-in chains, then each chain's rules. Accepted by
    `iptables-legacy-restore`."""
    lines = [f"*{table.name}"]
    chains = sorted(table.chains, key=lambda c: c.name)
    lines.extend(f":{c.name} - [0:0]" for c in chains)
    # Each jump is inserted at the top of its chain, so the kernel holds them in reverse order;
    # appended ones follow in their own order (other programs' rules may sit in between).
    for builtin in BUILTIN_CHAINS.get(table.name, ()):
        jumps = [j for j in table.jumps if j.chain == builtin]
        lines.extend(render_rule(j.chain, j.rule) for j in reversed(jumps) if not j.append)
        lines.extend(render_rule(j.chain, j.rule) for j in jumps if j.append)
    for chain in chains:
        lines.extend(render_rule(chain.name, rule) for rule in chain.rules)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_ruleset(ruleset: Ruleset) -> str:
    """All tables of a ruleset, in TABLE_ORDER."""
    tables = sorted(ruleset.tables, key=lambda t: table_rank(t.name))
    return "".join(render_table(t) for t in tables)
