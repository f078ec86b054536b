"""`iptables-save` text as chains of rule lines: the form in which kproxy compares what it wants
with what the kernel holds. Lines are kept verbatim; rendering makes planned rules identical.

Reading never fails: the text may hold anything another program (or an older kproxy) put in a
table. Lines are split on LF only, as iptables-restore splits them (a CR, VT, FF, NEL or U+2028 in
a comment is part of the rule). A rule whose quoted comment holds an LF is printed over several
lines; those are joined back into one rule line while the quote is open. A line that is none of
the known kinds is kept verbatim in `SavedTable.unparsed`, which nothing interprets or writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy.rules.ir import table_rank

_RULE = re.compile(r"-A[ \t]+([^ \t\n]+)")
_STRIPPED = " \t\r"


@dataclass
class SavedTable:
    name: str
    policies: dict[str, str] = field(default_factory=dict)  # built-in chain -> policy
    chains: dict[str, list[str]] = field(default_factory=dict)  # chain -> `-A ...` lines
    # Lines of this table that are not iptables-save syntax, verbatim and in order.
    unparsed: list[str] = field(default_factory=list)


def _quote_open(line: str, quoted: bool) -> bool:
    """Whether a double-quoted word is still open at the end of `line` (given whether one was
    open at its start). Quotes open at the start of a word; inside them `\\x` escapes x, as in
    iptables-save's output and kproxy.rules.parse."""
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"' and (i == 0 or line[i - 1] in " \t"):
            quoted = True
        i += 1
    return quoted


def _logical_lines(text: str) -> Iterator[str]:
    """Lines, with a rule continued while its quote is open. A quote still open at the end of the
    text was never a multi-line rule: its line is then taken alone."""
    physical = text.split("\n")
    i = 0
    while i < len(physical):
        line = physical[i]
        i += 1
        if not (line.lstrip(_STRIPPED).startswith("-A") and _quote_open(line, False)):
            yield line
            continue
        parts, quoted, j = [line], True, i
        while quoted and j < len(physical):
            parts.append(physical[j])
            quoted = _quote_open(physical[j], True)
            j += 1
        if quoted:
            yield line
        else:
            yield "\n".join(parts)
            i = j


def _add_line(current: SavedTable, line: str) -> None:
    if line.startswith(":"):
        words = line[1:].split(" ")
        if len(words) >= 2 and words[0] and words[1]:
            current.chains.setdefault(words[0], [])
            if words[1] != "-":
                current.policies[words[0]] = words[1]
            return
    elif (match := _RULE.match(line)) is not None:
        current.chains.setdefault(match.group(1), []).append(line)
        return
    current.unparsed.append(line)


def parse_save(text: str) -> dict[str, SavedTable]:
    """Tables from iptables-save output (or restore input in the same canonical form). Lines
    outside any table carry no rule and are skipped, as `#` comments are."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for logical in _logical_lines(text):
        line = logical.strip(_STRIPPED)
        if not line or line.startswith("#"):
            continue
        if line.startswith("*") and current is None:
            current = tables.setdefault(line[1:], SavedTable(line[1:]))
        elif line == "COMMIT":
            current = None
        elif current is not None:
            _add_line(current, line)
    return tables


def render_saved(tables: dict[str, SavedTable]) -> str:
    """SavedTables back to iptables-save text (user chains declared, unparsed lines, rules
    verbatim), tables in the same order as planned rulesets render."""
    out = []
    for table in sorted(tables.values(), key=lambda t: table_rank(t.name)):
        out.append(f"*{table.name}")
        out.extend(f":{name} - [0:0]" for name in table.chains if name not in table.policies)
        out.extend(table.unparsed)  # first: a rule's quote left open must not run into them
        for lines in table.chains.values():
            out.extend(lines)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""
