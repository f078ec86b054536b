"""render_nft_table: the IR as `nft list table` prints it (nft 1.0.6), for golden files, `dump`,
logs, and `nft -f` as an oracle in tests. Elements are sorted (the kernel lists hash sets in no
fixed order), and a long element list is wrapped one element a line, where nft packs short
ones; everything else is as nft lists it, in the table's order."""

from __future__ import annotations

import ipaddress

from kproxy.plan.nftables import ir

_NAMED_PRIORITIES = {"prerouting": ("dstnat", -100), "postrouting": ("srcnat", 100)}
_INDENT = "\t\t\t     "  # where nft continues an element list


def _key(key: ir.Key, family: str) -> str:
    if key in (ir.Key.SADDR, ir.Key.DADDR):
        return f"{family} {key.value}"
    return str(key.value)


def _keys(keys: tuple[ir.Key, ...], family: str) -> str:
    return " . ".join(_key(k, family) for k in keys)


def _value(key: ir.Key, value: str) -> str:
    if key is ir.Key.IIFNAME:
        return '"' + (value[:-1] + "*" if value.endswith("+") else value) + '"'
    return value


def render_verdict(v: ir.Verdict) -> str:
    return f"{v.kind} {v.chain}" if v.chain else v.kind


def _hex32(value: int) -> str:
    return f"0x{value:08x}"


def render_statement(stmt: ir.Statement, family: str) -> str:
    match stmt:
        case ir.Match(key, value, negate):
            op = "!= " if negate else ""
            return f"{_key(key, family)} {op}{_value(key, value)}"
        case ir.PortMatch(proto, port):
            return f"{proto} dport {port}"
        case ir.CtStateNew():
            return "ct state new"
        case ir.FibLocal(key):
            return f"fib {key.value} type local"
        case ir.MarkClear(mask):
            return f"meta mark & {_hex32(mask)} == {_hex32(0)}"
        case ir.NumgenZero(modulus):
            return f"numgen random mod {modulus} 0"
        case ir.Lookup(keys, set_name):
            return f"{_keys(keys, family)} @{set_name}"
        case ir.Vmap(keys, map_name):
            return f"{_keys(keys, family)} vmap @{map_name}"
        case ir.Verdict():
            return render_verdict(stmt)
        case ir.Reject():
            return "reject"
        case ir.Dnat(ip, port):
            host = f"[{ip}]" if family == "ip6" else ip
            return f"dnat to {host}:{port}"
        case ir.Masquerade():
            return "masquerade fully-random"
        case ir.MarkSet(op, value):
            return f"meta mark set meta mark {op} {_hex32(value)}"
        case ir.Update(set_name, key):
            return f"update @{set_name} {{ {_key(key, family)} }}"
    raise TypeError(f"unknown statement {stmt!r}")


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def render_rule(rule: ir.Rule, family: str) -> str:
    text = " ".join(render_statement(s, family) for s in rule.statements)
    return f"{text} comment {_quote(rule.comment)}" if rule.comment else text


def _priority(hook: ir.Hook) -> str:
    named = _NAMED_PRIORITIES.get(hook.hook)
    if named is None:
        return str(hook.priority)
    name, base = named
    offset = hook.priority - base
    if offset == 0:
        return name
    return f"{name} {'+' if offset > 0 else '-'} {abs(offset)}"


def _duration(seconds: int) -> str:
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def _element_sort_key(element: ir.Element) -> tuple[object, ...]:
    out: list[object] = []
    for part in element.key:
        try:
            out.append((0, int(ipaddress.ip_address(part)), ""))
        except ValueError:
            out.append((1, int(part), "") if part.isdigit() else (2, 0, part))
    return tuple(out)


def render_element(element: ir.Element) -> str:
    key = " . ".join(element.key)
    return f"{key} : {render_verdict(element.verdict)}" if element.verdict else key


def _render_set(s: ir.NamedSet, elements: frozenset[ir.Element]) -> list[str]:
    kind = "map" if s.verdict_map else "set"
    key = " . ".join(s.key_types) + (" : verdict" if s.verdict_map else "")
    lines = [f"\t{kind} {s.name} {{", f"\t\ttype {key}"]
    if s.size is not None:
        lines.append(f"\t\tsize {s.size}")
    if s.flags:
        lines.append(f"\t\tflags {','.join(s.flags)}")
    if s.timeout is not None:
        lines.append(f"\t\ttimeout {_duration(s.timeout)}")
    if s.comment:
        lines.append(f"\t\tcomment {_quote(s.comment)}")
    if elements:
        rendered = [render_element(e) for e in sorted(elements, key=_element_sort_key)]
        lines.append("\t\telements = { " + (",\n" + _INDENT).join(rendered) + " }")
    lines.append("\t}")
    return lines


def _render_chain(chain: ir.Chain, family: str) -> list[str]:
    lines = [f"\tchain {chain.name} {{"]
    if chain.comment:
        lines.append(f"\t\tcomment {_quote(chain.comment)}")
    if chain.hook is not None:
        hook = chain.hook
        lines.append(
            f"\t\ttype {hook.type} hook {hook.hook} priority {_priority(hook)}; policy accept;"
        )
    lines.extend(f"\t\t{render_rule(rule, family)}" for rule in chain.rules)
    lines.append("\t}")
    return lines


def render_nft_table(table: ir.NftTable) -> str:
    family = table.nft_family
    blocks = [_render_set(s, table.elements.get(s.name, frozenset())) for s in table.sets]
    blocks += [_render_chain(c, family) for c in table.chains]
    head = [f"table {family} {table.name} {{"]
    if table.comment:
        head.append(f"\tcomment {_quote(table.comment)}")
    body = "\n\n".join("\n".join(block) for block in blocks)
    return "\n".join(head) + "\n" + body + "\n}\n"
