"""`kproxy dump --diff` without root: the per-chain diff between the kernel's tables (as
iptables-save text) and the next sync's plan."""

from __future__ import annotations

import scenarios

from kproxy.dataplane.xtables.preview import plan_chain_diffs
from kproxy.inspect.diff_cmd import render_diffs
from kproxy.plan.iptables.naming import service_chain
from kproxy.rules.render import render_ruleset
from kproxy.rules.saved import parse_save


def test_nothing_to_change_gives_no_diff() -> None:
    ruleset = scenarios.single_service().ruleset()
    assert plan_chain_diffs(ruleset, parse_save(render_ruleset(ruleset))) == []
    assert render_diffs([]) == ""


def test_an_edited_service_shows_exactly_its_chains() -> None:
    before = scenarios.single_service()
    after = scenarios.single_service()
    after.slices[0]["endpoints"] = after.slices[0]["endpoints"][:2]  # 10.180.0.3 goes
    kernel = parse_save(render_ruleset(before.ruleset()))
    diffs = plan_chain_diffs(after.ruleset(), kernel)
    svc = service_chain(next(iter(after.state().services_map())))
    assert {(d.table, d.chain, d.change) for d in diffs} == {
        ("nat", svc, "rewritten"),
        ("nat", "KUBE-SEP-ICDUIKC33SFI6ZPR", "removed"),
    }
    text = render_diffs(diffs)
    assert text.startswith("# the next sync would change 2 chains: 1 removed, 1 rewritten\n")
    assert f"--- iptables nat {svc} (kernel)" in text
    assert "-A KUBE-SVC" in text and "+-A KUBE-SVC" in text
    assert "--to-destination 10.180.0.3:80" in text


def test_missing_jumps_and_a_new_table_are_shown_as_added() -> None:
    ruleset = scenarios.single_service().ruleset()
    diffs = plan_chain_diffs(ruleset, {})
    changes = {(d.table, d.chain): d.change for d in diffs}
    assert changes[("nat", "KUBE-SERVICES")] == "added"
    assert changes[("nat", "PREROUTING")] == "rewritten"
    prerouting = next(d for d in diffs if (d.table, d.chain) == ("nat", "PREROUTING"))
    assert any(line.startswith("+-A PREROUTING") for line in prerouting.lines)


def test_foreign_rules_in_builtin_chains_stay_in_the_diff_context() -> None:
    ruleset = scenarios.single_service().ruleset()
    text = render_ruleset(ruleset).replace(
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n',
        "-A PREROUTING -j CNI-HOSTPORT\n",
    )
    diffs = plan_chain_diffs(ruleset, parse_save(text))
    prerouting = next(d for d in diffs if d.chain == "PREROUTING")
    assert " -A PREROUTING -j CNI-HOSTPORT" in prerouting.lines
