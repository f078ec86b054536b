"""`iptables-save` text as chains of rule lines: the form in which kproxy compares what it wants
with what the kernel holds. Lines are kept verbatim; rendering makes planned rules identical."""

from __future__ import annotations

from dataclasses import dataclass, field

from kproxy.rules.ir import table_rank


@dataclass
class SavedTable:
    name: str
    policies: dict[str, str] = field(default_factory=dict)  # built-in chain -> policy
    chains: dict[str, list[str]] = field(default_factory=dict)  # chain -> `-A ...` lines


def parse_save(text: str) -> dict[str, SavedTable]:
    """Tables from iptables-save output (or restore input in the same canonical form)."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable(line[1:]))
        elif line == "COMMIT":
            current = None
        elif current is None:
            raise ValueError(f"iptables-save text: line outside a table: {line!r}")
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            current.chains.setdefault(name, [])
            if policy != "-":
                current.policies[name] = policy
        elif line.startswith("-A "):
            chain = line.split(maxsplit=2)[1]
            current.chains.setdefault(chain, []).append(line)
        else:
            raise ValueError(f"iptables-save text: unexpected line {line!r}")
    return tables


def render_saved(tables: dict[str, SavedTable]) -> str:
    """SavedTables back to iptables-save text (user chains declared, rules verbatim), tables in
    the same order as planned rulesets render."""
    out = []
    for table in sorted(tables.values(), key=lambda t: table_rank(t.name)):
        out.append(f"*{table.name}")
        out.extend(f":{name} - [0:0]" for name in table.chains if name not in table.policies)
        for lines in table.chains.values():
            out.extend(lines)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""
