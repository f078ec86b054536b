"""FakeDataplane: behaves like the kernel backend, refuses what the kernel refuses, keeps what
other programs wrote."""

from __future__ import annotations

import pytest
import scenarios

from kproxy.dataplane.base import Dataplane
from kproxy.dataplane.xtables.diff import owned_part, plan_table_changes
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.errors import DataplaneError
from kproxy.plan.iptables.chains import is_owned_chain
from kproxy.rules import fragments as f
from kproxy.rules.ir import Chain, JumpRule, Rule, Ruleset, Table, Target
from kproxy.rules.parse import parse_rule, parse_ruleset
from kproxy.rules.render import render_rule

CNI_RULES = """*filter
:FORWARD DROP [0:0]
:CNI-FORWARD - [0:0]
-A FORWARD -m comment --comment "CNI firewall plugin rules" -j CNI-FORWARD
-A CNI-FORWARD -d 10.244.0.0/16 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A CNI-FORWARD -s 10.244.0.0/16 -j ACCEPT
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A POSTROUTING -s 10.244.0.0/16 ! -o cni0 -j MASQUERADE --random-fully
COMMIT
"""


def _user_chains(dp: FakeDataplane, table: str) -> dict[str, list[str]]:
    saved = dp.read()[table]
    return {name: lines for name, lines in saved.chains.items() if name not in saved.policies}


def test_apply_then_read_gives_back_the_plan() -> None:
    dp: Dataplane = FakeDataplane()
    ruleset = scenarios.single_service().ruleset()
    result = dp.apply(ruleset)
    assert result.changed
    for table in ruleset.tables:
        saved = dp.read()[table.name]
        for chain in table.chains:
            assert saved.chains[chain.name] == [render_rule(chain.name, r) for r in chain.rules]


def test_jumps_end_up_at_the_top_in_kernel_order() -> None:
    dp = FakeDataplane()
    dp.load(CNI_RULES)
    ruleset = scenarios.single_service().ruleset()
    dp.apply(ruleset)
    filter_table = ruleset.table("filter")
    assert filter_table is not None
    forward = [render_rule(j.chain, j.rule) for j in filter_table.jumps if j.chain == "FORWARD"]
    assert dp.read()["filter"].chains["FORWARD"] == [
        *reversed(forward),
        '-A FORWARD -m comment --comment "CNI firewall plugin rules" -j CNI-FORWARD',
    ]
    # What the kernel holds parses back to the planned jumps, in the planned (insertion) order.
    parsed = parse_ruleset(dp.dump(), 4).table("filter")
    assert parsed is not None
    for chain in ("INPUT", "FORWARD", "OUTPUT"):
        planned = [j for j in filter_table.jumps if j.chain == chain]
        assert [j for j in parsed.jumps if j.chain == chain and j in planned] == planned


def test_second_apply_of_the_same_plan_changes_nothing() -> None:
    dp = FakeDataplane()
    ruleset = scenarios.affinity().ruleset()
    dp.apply(ruleset)
    commits = dp.commits
    result = dp.apply(scenarios.affinity().ruleset())
    assert not result.changed
    assert result.chains_unchanged == sum(len(t.chains) for t in ruleset.tables)
    assert dp.commits == commits


def test_a_change_rewrites_only_the_affected_chains() -> None:
    dp = FakeDataplane()
    dp.apply(scenarios.single_service().ruleset())
    scenario = scenarios.single_service()
    scenario.slices[0]["endpoints"].pop()  # 10.180.0.3 goes away
    result = dp.apply(scenario.ruleset())
    nat = next(t for t in result.tables if t.table == "nat")
    assert [c.name for c in nat.write] == ["KUBE-SVC-XPGD46QRK7WJZT7O"]
    assert len(nat.delete) == 1 and nat.delete[0].startswith("KUBE-SEP-")
    assert nat.delete[0] not in dp.read()["nat"].chains


def _without_shared(lines: list[str]) -> list[str]:
    """KUBE-FIREWALL is kubelet's as much as ours: cleanup leaves it, as upstream's does."""
    return [line for line in lines if "KUBE-FIREWALL" not in line]


def test_foreign_rules_survive_apply_and_cleanup() -> None:
    dp = FakeDataplane()
    dp.load(CNI_RULES)
    before = dp.read()
    dp.apply(scenarios.masquerade_all().ruleset())
    dp.apply(scenarios.no_endpoints().ruleset())
    dp.cleanup()
    after = dp.read()
    for name in ("filter", "nat"):
        assert set(after[name].chains) - set(before[name].chains) <= {"KUBE-FIREWALL"}
        for chain, lines in before[name].chains.items():
            assert _without_shared(after[name].chains[chain]) == lines
        assert after[name].policies == before[name].policies


def test_cleanup_removes_only_owned_chains_and_jumps() -> None:
    dp = FakeDataplane()
    dp.load(CNI_RULES)
    ruleset = scenarios.single_service().ruleset()
    dp.apply(ruleset)
    owned = [c.name for t in ruleset.tables for c in t.chains if is_owned_chain(c.name)]
    result = dp.cleanup()
    assert result.chains_removed == len(owned)
    for table in dp.read().values():
        assert not [c for c in table.chains if is_owned_chain(c)]
        for lines in table.chains.values():
            assert not any("KUBE-SERVICES" in line or "KUBE-POSTROUTING" in line for line in lines)
    assert "KUBE-KUBELET-CANARY" in dp.read()["nat"].chains
    assert not dp.cleanup().changed


def test_apply_after_cleanup_restores_everything() -> None:
    dp = FakeDataplane()
    ruleset = scenarios.affinity().ruleset()
    dp.apply(ruleset)
    first = {name: owned_part(t) for name, t in dp.read().items()}
    dp.cleanup()
    dp.apply(ruleset)
    again = {name: owned_part(t) for name, t in dp.read().items()}
    for name, table in first.items():
        for chain, lines in table.chains.items():
            # The shared KUBE-FIREWALL jump survives cleanup, so it may now sit lower.
            assert sorted(again[name].chains[chain]) == sorted(lines)


def _one_chain(name: str, *rules: Rule, table: str = "nat") -> Ruleset:
    return Ruleset(4, (Table(table, (Chain(name, rules),)),))


def _assert_refused(dp: FakeDataplane, ruleset: Ruleset, words: str) -> None:
    before = dp.read()
    with pytest.raises(DataplaneError, match=words):
        dp.apply(ruleset)
    assert dp.read() == before


def test_refuses_a_jump_to_a_missing_chain() -> None:
    dp = FakeDataplane()
    bad = _one_chain("KUBE-SVC-AAAAAAAAAAAAAAAA", Rule(target=f.jump("KUBE-SEP-MISSINGMISSING1")))
    _assert_refused(dp, bad, "no such chain or target")


def test_refuses_a_chain_name_longer_than_28() -> None:
    dp = FakeDataplane()
    _assert_refused(dp, _one_chain("KUBE-SVC-" + "A" * 20), "longer than 28")
    dp.apply(_one_chain("KUBE-SVC-" + "A" * 19))  # exactly 28 is fine


def test_refuses_creating_an_existing_chain() -> None:
    dp = FakeDataplane()
    ruleset = _one_chain("KUBE-SVC-AAAAAAAAAAAAAAAA")
    stale_plan = plan_table_changes(ruleset.tables[0], dp.read()["nat"])
    dp.apply(ruleset)
    before = dp.read()
    with pytest.raises(DataplaneError, match="already exists"):
        dp.commit_changes(stale_plan)
    assert dp.read() == before


def test_refuses_deleting_a_chain_still_referenced() -> None:
    """A foreign chain jumping to KUBE-MARK-MASQ keeps it alive (upstream #70615/#77476)."""
    dp = FakeDataplane()
    dp.apply(scenarios.single_service().ruleset())
    dp.load(
        "*nat\n:CNI-HOSTPORT-SETMARK - [0:0]\n-A CNI-HOSTPORT-SETMARK -j KUBE-MARK-MASQ\nCOMMIT\n"
    )
    before = dp.read()
    with pytest.raises(DataplaneError, match="still referenced"):
        dp.cleanup()
    after = dp.read()
    assert after["nat"] == before["nat"]  # nat committed nothing
    assert not [c for c in after["filter"].chains if is_owned_chain(c)]  # filter went first


@pytest.mark.parametrize(
    ("table", "chain_rules", "jump_from", "words"),
    [
        ("nat", (Rule(target=f.dnat("10.0.0.1:80")),), "POSTROUTING", "reachable from"),
        ("nat", (Rule(target=f.masquerade()),), "PREROUTING", "reachable from"),
        ("nat", (Rule(target=f.reject()),), "OUTPUT", "not valid in table nat"),
        ("filter", (Rule(target=f.dnat("10.0.0.1:80")),), "FORWARD", "not valid in table"),
        ("nat", (Rule(target=Target("NOSUCH")),), "OUTPUT", "no such chain or target"),
        ("nat", (Rule(target=f.jump("OUTPUT")),), "OUTPUT", "built-in chain"),
        ("nat", (Rule(target=f.jump("KUBE-SVC-LOOPLOOPLOOPLOOP")),), "OUTPUT", "loop"),
    ],
)
def test_refuses_targets_the_kernel_refuses(
    table: str, chain_rules: tuple[Rule, ...], jump_from: str, words: str
) -> None:
    dp = FakeDataplane()
    chain = Chain("KUBE-SVC-LOOPLOOPLOOPLOOP", chain_rules)
    jump = JumpRule(jump_from, Rule(target=f.jump(chain.name)))
    _assert_refused(dp, Ruleset(4, (Table(table, (chain,), (jump,)),)), words)


def test_unreachable_chains_are_not_hook_checked() -> None:
    dp = FakeDataplane()
    dp.apply(_one_chain("KUBE-SEP-AAAAAAAAAAAAAAAA", Rule(target=f.dnat("10.0.0.1:80"))))


def test_injected_failure_leaves_the_table_and_the_next_apply_works() -> None:
    dp = FakeDataplane()
    dp.fail_next_commit("resource temporarily unavailable")
    ruleset = scenarios.single_service().ruleset()
    _assert_refused(dp, ruleset, "resource temporarily unavailable")
    assert dp.apply(ruleset).changed
    assert not dp.apply(ruleset).changed


def test_load_refuses_what_the_kernel_would() -> None:
    dp = FakeDataplane()
    before = dp.read()
    with pytest.raises(DataplaneError):
        dp.load("*filter\n-A FORWARD -j CNI-MISSING\nCOMMIT\n")
    assert dp.read() == before


def test_history_records_each_commit() -> None:
    dp = FakeDataplane()
    dp.apply(scenarios.single_service().ruleset())
    assert [c.table for c in dp.history] == ["filter", "nat"]
    assert dp.commits == 2


def test_read_returns_a_copy() -> None:
    dp = FakeDataplane()
    dp.read()["nat"].chains["PREROUTING"].append("-A PREROUTING -j ACCEPT")
    assert dp.read()["nat"].chains["PREROUTING"] == []


def test_every_rule_the_fake_holds_is_parseable() -> None:
    dp = FakeDataplane()
    dp.load(CNI_RULES)
    dp.apply(scenarios.multi_port().ruleset())
    for table in dp.read().values():
        for chain, lines in table.chains.items():
            assert all(parse_rule(line)[0] == chain for line in lines)
