"""Which backend the iptables mode writes (as upstream's iptables-wrapper decides), and the
iptables-nft-restore input a table's changes become."""

from __future__ import annotations

from kproxy.dataplane.xtables.detect import BackendFacts, decide_backend
from kproxy.dataplane.xtables.diff import TableChanges, plan_table_changes
from kproxy.dataplane.xtables.nft_generation import _parse_generation
from kproxy.dataplane.xtables.nft_restore import render_restore
from kproxy.rules.ir import Chain, JumpRule, Match, Opt, Rule, Table, Target
from kproxy.rules.saved import parse_save

HINT = frozenset({"KUBE-IPTABLES-HINT"})
NONE: frozenset[str] = frozenset()


def test_kubelets_hint_decides_nft_first_then_legacy() -> None:
    assert decide_backend("auto", BackendFacts(HINT, NONE, 0, 0)).backend == "nft"
    assert decide_backend("auto", BackendFacts(NONE, HINT, 0, 99)).backend == "legacy"
    assert decide_backend("auto", BackendFacts(HINT, HINT, 0, 0)).backend == "nft"


def test_without_a_hint_the_fuller_backend_wins_and_nft_on_a_tie() -> None:
    assert decide_backend("auto", BackendFacts(NONE, NONE, 3, 10)).backend == "legacy"
    assert decide_backend("auto", BackendFacts(NONE, NONE, 10, 3)).backend == "nft"
    assert decide_backend("auto", BackendFacts(NONE, NONE, 0, 0)).backend == "nft"


def test_an_override_needs_no_facts() -> None:
    choice = decide_backend("legacy", None)
    assert choice.backend == "legacy" and "iptablesBackend" in choice.reason


def _jump(chain: str, target: str) -> JumpRule:
    comment = Match("comment", (Opt("comment", "kubernetes service portals"),))
    return JumpRule(chain, Rule(matches=(comment,), target=Target(target)))


def test_restore_names_only_what_changes_and_removes_jumps_by_spec() -> None:
    current = parse_save(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-OLD - [0:0]\n:KUBE-SERVICES - [0:0]\n"
        ":CNI-HOSTPORT-DNAT - [0:0]\n"
        "-A PREROUTING -j CNI-HOSTPORT-DNAT\n-A PREROUTING -j KUBE-SVC-OLD\n"
        "-A KUBE-SVC-OLD -j RETURN\nCOMMIT\n"
    )["nat"]
    desired = Table(
        "nat",
        (Chain("KUBE-SERVICES", (Rule(dst="10.0.0.1/32", target=Target("RETURN")),)),),
        (_jump("PREROUTING", "KUBE-SERVICES"),),
    )

    text = render_restore(plan_table_changes(desired, current), current)

    assert text.splitlines() == [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-SVC-OLD - [0:0]",
        "-D PREROUTING -j KUBE-SVC-OLD",
        "-A KUBE-SERVICES -d 10.0.0.1/32 -j RETURN",
        "-X KUBE-SVC-OLD",
        '-I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "COMMIT",
    ]


def test_nothing_to_change_is_an_empty_transaction() -> None:
    assert render_restore(TableChanges("filter"), None) == "*filter\nCOMMIT\n"


def test_generation_is_read_from_a_newgen_reply() -> None:
    attr = (8).to_bytes(2, "little") + (1).to_bytes(2, "little") + (77).to_bytes(4, "big")
    body = bytes(4) + attr
    header = (16 + len(body)).to_bytes(4, "little") + ((10 << 8) | 15).to_bytes(2, "little")
    assert _parse_generation(header + bytes(10) + body) == 77
    assert _parse_generation(b"") is None
