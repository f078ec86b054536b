"""render_*: the IR as iptables-legacy-save prints it."""

from __future__ import annotations

import pytest

from kproxy.rules import fragments as f
from kproxy.rules.ir import Chain, JumpRule, Match, Opt, Rule, Ruleset, Table, Target
from kproxy.rules.render import render_rule, render_ruleset, render_string, render_table


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        ("plain-word_1", "plain-word_1"),
        ("ns1/svc1:p80", '"ns1/svc1:p80"'),
        ("two words", '"two words"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("it's", r'"it\'s"'),
        ("", '""'),
    ],
)
def test_render_string_quotes_as_xtables_save_string(value: str, printed: str) -> None:
    assert render_string(value) == printed


def test_rule_fields_print_in_iptables_save_order() -> None:
    rule = Rule(
        src="10.0.0.0/8",
        src_invert=True,
        dst="172.30.0.41/32",
        in_iface="cni0",
        out_iface="eth0",
        out_invert=True,
        protocol="tcp",
        matches=(f.comment("a b"), f.protocol_match("tcp", 80)),
        target=f.jump("KUBE-MARK-MASQ"),
    )
    assert render_rule("C", rule) == (
        '-A C ! -s 10.0.0.0/8 -d 172.30.0.41/32 -i cni0 ! -o eth0 -p tcp -m comment --comment "a b"'
        " -m tcp --dport 80 -j KUBE-MARK-MASQ"
    )


@pytest.mark.parametrize(
    ("rule", "line"),
    [
        (Rule(), "-A C"),
        (Rule(target=Target("X", goto=True)), "-A C -g X"),
        (Rule(target=f.set_mark("0x4000", "0x4000")), "-A C -j MARK --set-xmark 0x4000/0x4000"),
        (Rule(target=f.set_mark("0x4000", "0x0")), "-A C -j MARK --set-xmark 0x4000/0x0"),
        (Rule(target=f.masquerade()), "-A C -j MASQUERADE --random-fully"),
        (Rule(target=f.reject(6)), "-A C -j REJECT --reject-with icmp6-port-unreachable"),
        (
            Rule(matches=(f.mark("0x4000/0x4000", invert=True),), target=f.RETURN),
            "-A C -m mark ! --mark 0x4000/0x4000 -j RETURN",
        ),
        (
            Rule(matches=(f.ctstate("RELATED,ESTABLISHED,DNAT", invert=True),), target=f.DROP),
            "-A C -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        ),
        (
            Rule(matches=(f.addrtype(dst_type="LOCAL", src_type="LOCAL"),)),
            "-A C -m addrtype --src-type LOCAL --dst-type LOCAL",
        ),
        (
            Rule(matches=(f.recent_check("KUBE-SEP-X", 10800, 6),), target=f.jump("KUBE-SEP-X")),
            "-A C -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-X"
            " --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -j KUBE-SEP-X",
        ),
        (
            Rule(
                matches=(Match("comment", (Opt("comment", "x"),)),), target=f.dnat("[fd00::1]:80")
            ),
            "-A C -m comment --comment x -j DNAT --to-destination [fd00::1]:80",
        ),
    ],
)
def test_render_rule(rule: Rule, line: str) -> None:
    assert render_rule("C", rule) == line


@pytest.mark.parametrize(
    ("n", "printed"),
    [
        (2, "0.50000000000"),
        (3, "0.33333333349"),
        (4, "0.25000000000"),
        (5, "0.20000000019"),
        (6, "0.16666666651"),
        (7, "0.14285714272"),
        (10, "0.10000000009"),
        (1000, "0.00100000016"),
    ],
)
def test_probability_is_what_the_kernel_prints_for_upstreams_value(n: int, printed: str) -> None:
    """Upstream writes 1/n with 10 decimals; libxt_statistic stores it as a 31-bit fraction
    (rounded) and prints that with 11 decimals."""
    assert f.probability(n) == printed
    stored = round(float(f"{1.0 / n:0.10f}") * 0x80000000)
    assert printed == f"{stored / 0x80000000:.11f}"


def test_comment_is_cut_to_what_the_kernel_keeps() -> None:
    assert f.comment("x" * 300).opts[0].value == "x" * 255


def test_cidr_is_canonical() -> None:
    assert f.cidr("10.0.0.1") == "10.0.0.1/32"
    assert f.cidr("10.1.2.3/8") == "10.0.0.0/8"
    assert f.cidr("fd00::1") == "fd00::1/128"


def test_table_declares_chains_sorted_and_prints_jumps_as_the_kernel_holds_them() -> None:
    table = Table(
        "filter",
        chains=(Chain("KUBE-B", (Rule(target=f.ACCEPT),)), Chain("KUBE-A")),
        jumps=(
            JumpRule("OUTPUT", Rule(target=f.jump("KUBE-A"))),
            JumpRule("FORWARD", Rule(target=f.jump("KUBE-A"))),
            JumpRule("FORWARD", Rule(target=f.jump("KUBE-B"))),
            JumpRule("INPUT", Rule(target=f.jump("KUBE-B"))),
        ),
    )
    assert render_table(table) == (
        "*filter\n"
        ":KUBE-A - [0:0]\n"
        ":KUBE-B - [0:0]\n"
        "-A INPUT -j KUBE-B\n"
        "-A FORWARD -j KUBE-B\n"  # inserted last at the top of FORWARD: first in the kernel
        "-A FORWARD -j KUBE-A\n"
        "-A OUTPUT -j KUBE-A\n"
        "-A KUBE-B -j ACCEPT\n"
        "COMMIT\n"
    )


def test_ruleset_prints_filter_before_nat() -> None:
    ruleset = Ruleset(4, (Table("nat"), Table("filter")))
    assert render_ruleset(ruleset) == "*filter\nCOMMIT\n*nat\nCOMMIT\n"
