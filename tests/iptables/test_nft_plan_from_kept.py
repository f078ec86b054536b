"""The nft backend's changes from the kept table (nft_backend.changes_from) are exactly
plan_table_changes_from's: it only skips comparing the chains that are equal at both ends."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scenarios import Scenario
from test_incremental import move_to
from test_properties import clusters

from kproxy.dataplane.xtables.diff import plan_table_changes_from
from kproxy.dataplane.xtables.nft_backend import changes_from
from kproxy.plan.iptables.planner import IptablesPlanner
from kproxy.rules import fragments as f
from kproxy.rules.ir import Chain, Rule, Table
from kproxy.state.cluster import ClusterState

NAMES = [f"KUBE-SEP-{i:016}" for i in range(12)] + ["KUBE-SERVICES", "KUBE-NODEPORTS"]
RULES = [Rule(target=f.RETURN), Rule(target=f.ACCEPT), Rule(target=f.jump("KUBE-MARK-MASQ"))]


@st.composite
def tables(draw: st.DrawFn) -> tuple[Table, Table]:
    """Two versions of a table whose chains are shared objects, equal copies or new ones."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=10))
    chains = [Chain(n, tuple(draw(st.lists(st.sampled_from(RULES), max_size=2)))) for n in names]
    new = []
    for chain in chains:
        how = draw(st.sampled_from(["same", "copy", "rewritten", "gone"]))
        if how == "same":
            new.append(chain)
        elif how == "copy":
            new.append(Chain(chain.name, chain.rules))
        elif how == "rewritten":
            new.append(Chain(chain.name, (*chain.rules, Rule(target=f.DROP))))
    unused = [n for n in NAMES if n not in names]
    added = draw(st.lists(st.sampled_from(unused), unique=True, max_size=3)) if unused else []
    for name in added:
        new.insert(draw(st.integers(0, len(new))), Chain(name, (RULES[0],)))
    return Table("nat", chains=tuple(new)), Table("nat", chains=tuple(chains))


@given(tables())
def test_changes_from_the_kept_table_are_the_full_comparisons(pair: tuple[Table, Table]) -> None:
    desired, applied = pair
    assert changes_from(desired, applied) == plan_table_changes_from(desired, applied)


@settings(max_examples=40, deadline=None)
@given(st.lists(clusters(), min_size=2, max_size=4))
def test_changes_between_plans_are_the_full_comparisons(steps: list[Scenario]) -> None:
    state, planner = ClusterState(), IptablesPlanner(steps[0].config)
    last = None
    for step in steps:
        move_to(state, step)
        plan = planner.plan(state.services_map(), state.endpoints_map(), step.node, (4, 6))
        for family, ruleset in plan.kernel.items():
            for table in ruleset.tables:
                applied = last.kernel[family].table(table.name) if last else None
                if applied is not None:
                    assert changes_from(table, applied) == plan_table_changes_from(table, applied)
        last = plan
