"""parse_rule / parse_ruleset: the inverse of the renderer, on kproxy's lines and upstream's."""

from __future__ import annotations

from pathlib import Path

import pytest
import scenarios
from hypothesis import given
from hypothesis import strategies as st

from kproxy.rules import fragments as f
from kproxy.rules.ir import JumpRule, Match, Opt, Rule, Target
from kproxy.rules.parse import parse_rule, parse_ruleset, parse_table
from kproxy.rules.render import render_rule, render_ruleset
from kproxy.rules.saved import parse_save

# An iptables-legacy-save dump of a node running upstream kube-proxy, kubelet and a CNI.
UPSTREAM_SAVE = (Path(__file__).parents[1] / "golden" / "upstream.save").read_text()
UPSTREAM_LINES = [line for line in UPSTREAM_SAVE.splitlines() if line.startswith("-A ")]


def _line(*parts: str) -> str:
    """The one upstream line containing every part."""
    (line,) = [line for line in UPSTREAM_LINES if all(p in line for p in parts)]
    return line


@pytest.mark.parametrize("line", UPSTREAM_LINES)
def test_upstream_lines_round_trip(line: str) -> None:
    assert render_rule(*parse_rule(line)) == line


def test_parse_rule_fields_and_inversion() -> None:
    chain, rule = parse_rule(_line("! -s 10.244.0.0/16 -d 10.96.0.10/32"))
    assert chain == "KUBE-SVC-TCOU7JCQXEZGVUNU"
    assert (rule.src, rule.src_invert, rule.dst, rule.dst_invert) == (
        "10.244.0.0/16",
        True,
        "10.96.0.10/32",
        False,
    )
    assert rule.protocol == "udp"
    assert rule.comment == "kube-system/kube-dns:dns cluster IP"
    assert rule.match("udp") == Match("udp", (Opt("dport", "53"),))
    assert rule.target == Target("KUBE-MARK-MASQ")


def test_parse_rule_inverted_match_option() -> None:
    _, rule = parse_rule(_line("-A KUBE-FIREWALL"))
    assert rule.match("conntrack") == Match(
        "conntrack", (Opt("ctstate", "RELATED,ESTABLISHED,DNAT", invert=True),)
    )


def test_parse_rule_options_without_values() -> None:
    _, rule = parse_rule(_line("--rcheck"))
    assert rule.match("recent") == f.recent_check("KUBE-SEP-A", 10800)
    _, rule = parse_rule(_line("recent --set"))
    assert rule.match("recent") == f.recent_set("KUBE-SEP-A")
    _, rule = parse_rule(_line("-A KUBE-POSTROUTING", "MASQUERADE"))
    assert rule.target == f.masquerade()


def test_parse_rule_target_options_and_goto() -> None:
    assert parse_rule(_line("DNAT --to-destination 10.244.0.2:53"))[1].target == f.dnat(
        "10.244.0.2:53"
    )
    assert parse_rule(_line("REJECT"))[1].target == f.reject()
    assert parse_rule(_line("-g CNI-ISOLATION"))[1].target == Target("CNI-ISOLATION", goto=True)


def test_parse_rule_without_target_counts_only() -> None:
    _, rule = parse_rule(_line("-s 192.168.0.0/24"))
    assert rule == Rule(src="192.168.0.0/24")


def test_parse_rule_unescapes_quoted_comment() -> None:
    line = r'-A X -m comment --comment "say \"hi\" \\ it' "\\'" r's" -j ACCEPT'
    _, rule = parse_rule(line)
    assert rule.comment == 'say "hi" \\ it\'s'
    assert render_rule("X", rule) == line


def test_parse_rule_keeps_other_quoted_values_as_printed() -> None:
    _, rule = parse_rule(_line("LOG"))
    assert rule.target == Target("LOG", (Opt("log-prefix", '"new conn: "'),))
    assert rule.match("tcp") == Match("tcp", (Opt("tcp-flags", "FIN,SYN,RST,ACK SYN"),))


def test_parse_rule_restore_input_order() -> None:
    """Upstream's restore input puts -p/-d among the matches and may leave out `-m tcp`."""
    _, rule = parse_rule(
        '-A KUBE-SERVICES -m comment --comment "a cluster IP" -m tcp -p tcp -d 10.0.0.1/32 '
        "--dport 80 -j KUBE-SVC-A"
    )
    assert rule.dst == "10.0.0.1/32"
    assert rule.match("tcp") == Match("tcp", (Opt("dport", "80"),))
    _, rule = parse_rule("-A X -p udp --dport 53 -j ACCEPT")
    assert rule.matches == (Match("udp", (Opt("dport", "53"),)),)


@pytest.mark.parametrize(
    "line",
    [
        "-I X -j ACCEPT",
        "-A",
        "-A X -f -j ACCEPT",
        "-A X --dport 80 -j ACCEPT",
        "-A X -m comment --comment",
        '-A X -m comment --comment "unterminated',
        "-A X -j ACCEPT -j DROP",
        "-A X ! -m tcp -j ACCEPT",
        "-A X -q 1",
    ],
)
def test_parse_rule_refuses_what_the_ir_cannot_hold(line: str) -> None:
    with pytest.raises(ValueError):
        parse_rule(line)


_COMMENT_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")),
    min_size=1,
    max_size=40,
)


@given(_COMMENT_TEXT)
def test_any_comment_round_trips(text: str) -> None:
    rule = Rule(protocol="tcp", matches=(f.comment(text), f.protocol_match("tcp", 80)))
    line = render_rule("KUBE-SVC-X", rule)
    assert parse_rule(line) == ("KUBE-SVC-X", rule)


@pytest.mark.parametrize("name", sorted(scenarios.SCENARIOS))
@pytest.mark.parametrize("family", [4, 6])
def test_every_planned_line_round_trips(name: str, family: int) -> None:
    ruleset = scenarios.SCENARIOS[name]().ruleset(family)
    for table in ruleset.tables:
        for chain in table.chains:
            for rule in chain.rules:
                line = render_rule(chain.name, rule)
                assert parse_rule(line) == (chain.name, rule)
                assert render_rule(*parse_rule(line)) == line
        for jump in table.jumps:
            assert parse_rule(render_rule(jump.chain, jump.rule)) == (jump.chain, jump.rule)


@pytest.mark.parametrize("family", [4, 6])
def test_parse_ruleset_reads_back_a_planned_ruleset(family: int) -> None:
    ruleset = scenarios.affinity().ruleset(family)
    parsed = parse_ruleset(render_ruleset(ruleset), family)
    assert parsed.family == family
    for table in ruleset.tables:
        got = parsed.table(table.name)
        assert got is not None
        assert sorted(got.chains, key=lambda c: c.name) == sorted(
            table.chains, key=lambda c: c.name
        )
        for chain in {j.chain for j in table.jumps}:
            assert [j for j in got.jumps if j.chain == chain] == [
                j for j in table.jumps if j.chain == chain
            ]


def test_parse_ruleset_of_iptables_save_output() -> None:
    ruleset = parse_ruleset(UPSTREAM_SAVE, 4)
    nat = ruleset.table("nat")
    assert nat is not None
    assert [c.name for c in nat.chains][:3] == [
        "CNI-HOSTPORT-DNAT",
        "KUBE-IPVS",
        "KUBE-KUBELET-CANARY",
    ]
    # Built-in chains' rules become jumps in insertion order: the kernel's first rule comes last.
    assert [(j.chain, j.rule.target.name) for j in nat.jumps if j.rule.target] == [
        ("PREROUTING", "CNI-HOSTPORT-DNAT"),
        ("PREROUTING", "KUBE-SERVICES"),
        ("OUTPUT", "KUBE-SERVICES"),
        ("POSTROUTING", "MASQUERADE"),
        ("POSTROUTING", "KUBE-POSTROUTING"),
    ]


def test_parsed_dump_renders_back_line_for_line() -> None:
    rendered = render_ruleset(parse_ruleset(UPSTREAM_SAVE, 4))
    assert [line for line in rendered.splitlines() if line.startswith("-A ")] == UPSTREAM_LINES


def test_parse_table_of_a_table_with_custom_builtin_policy() -> None:
    saved = parse_save("*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j CT --notrack\nCOMMIT\n")
    table = parse_table(saved["raw"])
    assert table.chains == ()
    assert table.jumps == (JumpRule("PREROUTING", Rule(target=Target("CT", (Opt("notrack"),)))),)


def test_parse_ruleset_refuses_a_rule_under_the_wrong_chain() -> None:
    saved = parse_save("*nat\n:A - [0:0]\n-A A -j RETURN\nCOMMIT\n")
    saved["nat"].chains["A"].append("-A B -j RETURN")
    with pytest.raises(ValueError):
        parse_table(saved["nat"])


def test_inverted_protocol_round_trips() -> None:
    line = '-A X ! -p tcp -m comment --comment "not tcp" -j ACCEPT'
    chain, rule = parse_rule(line)
    assert chain == "X" and rule.protocol == "tcp" and rule.protocol_invert
    assert render_rule(chain, rule) == line
