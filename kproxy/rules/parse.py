"""Parse `iptables-save` text back into the rule IR: the inverse of kproxy.rules.render.

`render_rule(*parse_rule(line)) == line` holds for every line kproxy renders and for the lines
iptables-legacy-save prints for them. Rule lines of other programs (a CNI's, kubelet's) parse too,
as long as the IR can hold them; anything it cannot (`-f`) raises ValueError rather than
being read as a different rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kproxy.rules.ir import (
    BUILTIN_CHAINS,
    Chain,
    JumpRule,
    Match,
    Opt,
    Rule,
    Ruleset,
    Table,
    Target,
)
from kproxy.rules.render import QUOTED_OPTIONS
from kproxy.rules.saved import SavedTable, parse_save

# A QUOTED_OPTIONS value is always exactly one word, unescaped here. Other options keep their
# words as printed.

# `-s`/`-d`/`-i`/`-o`: the Rule fields holding the value and its inversion.
_ADDRESS_FIELDS = {
    "-s": ("src", "src_invert"),
    "-d": ("dst", "dst_invert"),
    "-i": ("in_iface", "in_invert"),
    "-o": ("out_iface", "out_invert"),
}


@dataclass(frozen=True, slots=True)
class _Word:
    text: str  # unquoted and unescaped
    raw: str  # as printed
    quoted: bool

    @property
    def is_value(self) -> bool:
        """True when the word can only be an option's value, not a flag or `!`."""
        return self.quoted or not (self.text == "!" or self.text.startswith("-"))


# What separates words for iptables-restore; other whitespace (VT, FF, NEL, ...) is word text.
_BLANKS = frozenset(" \t\n")


def _split_words(line: str) -> list[_Word]:
    """Split like iptables-restore: blanks separate, double quotes group, `\\x` escapes x."""
    words: list[_Word] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] in _BLANKS:
            i += 1
            continue
        start = i
        if line[i] == '"':
            text, i = _read_quoted(line, i + 1)
            words.append(_Word(text, line[start:i], True))
            continue
        while i < n and line[i] not in _BLANKS:
            i += 1
        words.append(_Word(line[start:i], line[start:i], False))
    return words


def _read_quoted(line: str, i: int) -> tuple[str, int]:
    """The unescaped text of a quoted word starting after its opening quote, and the index past
    its closing quote."""
    out: list[str] = []
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            out.append(line[i + 1])
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise ValueError(f"unterminated quote in rule: {line!r}")


@dataclass
class _RuleParser:
    """Walks the words after `-A CHAIN`, filling the pieces of one Rule."""

    line: str
    words: list[_Word]
    pos: int = 0
    fields: dict[str, str | bool] = field(default_factory=dict)
    protocol: str | None = None
    protocol_invert: bool = False
    matches: list[tuple[str, list[Opt]]] = field(default_factory=list)
    target: tuple[str, bool, list[Opt]] | None = None

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"cannot parse rule {self.line!r}: {problem}")

    def next_word(self, what: str) -> _Word:
        if self.pos >= len(self.words):
            raise self.fail(f"missing {what}")
        word = self.words[self.pos]
        self.pos += 1
        return word

    def parse(self) -> Rule:
        while self.pos < len(self.words):
            invert = self.words[self.pos].text == "!" and not self.words[self.pos].quoted
            if invert:
                self.pos += 1
            word = self.next_word("flag after '!'")
            if word.quoted:
                raise self.fail(f"unexpected quoted word {word.raw}")
            self.dispatch(word.text, invert)
        return self.build()

    def dispatch(self, flag: str, invert: bool) -> None:
        if flag in _ADDRESS_FIELDS:
            name, invert_name = _ADDRESS_FIELDS[flag]
            self.fields[name] = self.next_word(f"value of {flag}").text
            self.fields[invert_name] = invert
        elif flag == "-p":
            self.protocol = self.next_word("value of -p").text
            self.protocol_invert = invert
        elif flag == "-m":
            if invert:
                raise self.fail("'!' before -m")
            self.matches.append((self.next_word("match name").text, []))
        elif flag in ("-j", "-g"):
            if invert or self.target is not None:
                raise self.fail(f"unexpected {'! ' if invert else ''}{flag}")
            self.target = (self.next_word(f"target after {flag}").text, flag == "-g", [])
        elif flag == "-f":
            raise self.fail("'-f' (fragments) cannot be held by the rule IR")
        elif flag.startswith("--") and len(flag) > 2:
            self.current_opts(flag).append(Opt(flag[2:], self.option_value(flag[2:]), invert))
        else:
            raise self.fail(f"unknown flag {flag!r}")

    def current_opts(self, flag: str) -> list[Opt]:
        """The options list a `--name` belongs to: the target's, else the last match's, else an
        implicit match named after the protocol (`-p tcp --dport 80` in restore input)."""
        if self.target is not None:
            return self.target[2]
        if self.matches:
            return self.matches[-1][1]
        if self.protocol is not None:
            self.matches.append((self.protocol, []))
            return self.matches[-1][1]
        raise self.fail(f"option {flag} outside a match or target")

    def option_value(self, name: str) -> str:
        if name in QUOTED_OPTIONS:
            return self.next_word(f"value of --{name}").text
        raws = []
        while self.pos < len(self.words) and self.words[self.pos].is_value:
            raws.append(self.words[self.pos].raw)
            self.pos += 1
        return " ".join(raws)

    def build(self) -> Rule:
        target = None
        if self.target is not None:
            name, goto, opts = self.target
            target = Target(name, tuple(opts), goto)
        return Rule(
            src=_str_or_none(self.fields.get("src")),
            src_invert=bool(self.fields.get("src_invert", False)),
            dst=_str_or_none(self.fields.get("dst")),
            dst_invert=bool(self.fields.get("dst_invert", False)),
            in_iface=_str_or_none(self.fields.get("in_iface")),
            in_invert=bool(self.fields.get("in_invert", False)),
            out_iface=_str_or_none(self.fields.get("out_iface")),
            out_invert=bool(self.fields.get("out_invert", False)),
            protocol=self.protocol,
            protocol_invert=self.protocol_invert,
            matches=tuple(Match(name, tuple(opts)) for name, opts in self.matches),
            target=target,
        )


def _str_or_none(value: str | bool | None) -> str | None:
    return value if isinstance(value, str) else None


def parse_rule(line: str) -> tuple[str, Rule]:
    """`-A CHAIN ...` -> (CHAIN, Rule). Raises ValueError for a line the IR cannot hold."""
    words = _split_words(line.strip(" \t\r\n"))
    if len(words) < 2 or words[0].raw != "-A" or not words[1].is_value:
        raise ValueError(f"cannot parse rule {line!r}: expected '-A CHAIN ...'")
    return words[1].text, _RuleParser(line, words[2:]).parse()


def _builtin_chains(saved: SavedTable) -> set[str]:
    return set(BUILTIN_CHAINS.get(saved.name, ())) | set(saved.policies)


def parse_table(saved: SavedTable) -> Table:
    """One table as the IR. Rules in built-in chains become Table.jumps, listed in insertion order
    (each JumpRule is inserted at the top of its chain, so the kernel's first rule comes last)."""
    builtins = _builtin_chains(saved)
    chains: list[Chain] = []
    jumps: list[JumpRule] = []
    for name, lines in saved.chains.items():
        rules = []
        for line in lines:
            chain, rule = parse_rule(line)
            if chain != name:
                raise ValueError(f"rule {line!r} listed under chain {name}")
            rules.append(rule)
        if name in builtins:
            jumps.extend(JumpRule(name, rule) for rule in reversed(rules))
        else:
            chains.append(Chain(name, tuple(rules)))
    return Table(saved.name, tuple(chains), tuple(jumps))


def parse_ruleset(text: str, family: int) -> Ruleset:
    """Every table of iptables-save text as one Ruleset of the given family (4 or 6)."""
    return Ruleset(family, tuple(parse_table(saved) for saved in parse_save(text).values()))


def parse_table_leniently(saved: SavedTable) -> tuple[Table, list[str]]:
    """parse_table for a table other programs write too: a rule line the IR cannot hold is
    left out and returned, verbatim, beside the table (with the table's unparsed lines)."""
    readable = SavedTable(saved.name, dict(saved.policies))
    unreadable = list(saved.unparsed)
    for name, lines in saved.chains.items():
        kept = readable.chains.setdefault(name, [])
        for line in lines:
            try:
                parse_rule(line)
            except ValueError:
                unreadable.append(line)
            else:
                kept.append(line)
    return parse_table(readable), unreadable
