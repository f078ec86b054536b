"""The incremental paths change nothing but speed: a state mutated in place and planned with a
shared cache plans exactly what a fresh state would, and a partial apply (from the last commit)
leaves the same tables as a full one (from the kernel's rules)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scenarios import Scenario
from test_properties import CNI, clusters

from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.model.convert import build_endpoint_slice, build_service_ports
from kproxy.model.service import NamespacedName
from kproxy.plan.iptables.ruleset import PlanCache, plan_ruleset
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import object_key


def move_to(state: ClusterState, scenario: Scenario) -> None:
    """Mutate `state` in place until it holds exactly `scenario`'s objects."""
    wanted = {object_key(o): o for o in scenario.services}
    for key in state.service_keys() - wanted.keys():
        state.delete_service(key)
    for key, obj in wanted.items():
        state.set_service(key, build_service_ports(obj))
    slices = {object_key(o): o for o in scenario.slices}
    for key in state.slice_keys() - slices.keys():
        state.delete_slice(key)
    for obj in slices.values():
        info = build_endpoint_slice(obj)
        if info is not None:
            state.set_slice(info)


@settings(max_examples=60, deadline=None)
@given(st.lists(clusters(), min_size=2, max_size=4), st.sampled_from([4, 6]))
def test_cached_plans_of_a_mutated_state_equal_fresh_plans(
    steps: list[Scenario], family: int
) -> None:
    state, cache = ClusterState(), PlanCache()
    for step in steps:
        move_to(state, step)
        fresh = step.state()
        assert state.endpoints_map() == fresh.endpoints_map()
        cached = plan_ruleset(
            state.services_map(), state.endpoints_map(), step.node, step.config, family, cache
        ).ruleset
        assert cached == step.ruleset(family)


@settings(max_examples=60, deadline=None)
@given(st.lists(clusters(), min_size=2, max_size=4), st.sampled_from([4, 6]))
def test_partial_applies_leave_what_a_full_apply_leaves(steps: list[Scenario], family: int) -> None:
    # The same history applied in full each time (shared chains such as KUBE-FIREWALL are never
    # deleted, so what the tables hold depends on the history, not only on the last step).
    incremental, reference = FakeDataplane(family), FakeDataplane(family)
    incremental.load(CNI)
    reference.load(CNI)
    for i, step in enumerate(steps):
        result = incremental.apply(step.ruleset(family), full=i == 0)
        if i == 0:
            assert result.read_kernel
        elif step.config == steps[i - 1].config:
            # Same jump rules in the built-in chains: nothing needs the kernel's rules.
            assert not result.read_kernel
        reference.apply(step.ruleset(family), full=True)
        assert incremental.dump() == reference.dump()


def test_a_foreign_write_sends_the_next_partial_apply_to_the_kernel() -> None:
    scenario = Scenario(
        services=[
            {
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 80}]},
            }
        ]
    )
    fake = FakeDataplane()
    fake.apply(scenario.ruleset(), full=True)
    assert not fake.apply(scenario.ruleset(), full=False).read_kernel
    fake.load("*nat\n:OTHER - [0:0]\n-A OTHER -j RETURN\nCOMMIT\n")
    assert fake.apply(scenario.ruleset(), full=False).read_kernel
    assert NamespacedName("default", "web")
