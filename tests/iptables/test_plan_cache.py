"""The iptables planner's cache (plan/iptables/kept.py) changes nothing but speed: after any few
changes, a plan patched from the last one equals a plan made afresh, across the large-cluster
threshold too; and the rules it counts as it plans are what count_rules counts in the plan."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scenarios import Scenario
from test_incremental import move_to
from test_properties import clusters

from kproxy.model.config import ProxyConfig
from kproxy.model.convert import EndpointSliceInfo, EndpointSlicePort
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.iptables import kept
from kproxy.plan.iptables.kept import PlanCache
from kproxy.plan.iptables.planner import IptablesPlanner
from kproxy.plan.iptables.ruleset import LARGE_CLUSTER_ENDPOINTS, plan_ruleset
from kproxy.plan.xtables import count_rules
from kproxy.state.cluster import ClusterState

NODE = NodeInfo("node-a")
CONFIG = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))


def key(i: int) -> NamespacedName:
    return NamespacedName("bench", f"svc-{i:03}")


def set_service(state: ClusterState, i: int, node_port: int = 0) -> None:
    spn = ServicePortName(key(i), "http", Protocol.TCP)
    cluster_ips = (f"10.96.{i // 256}.{i % 256}", f"fd00:96::{i:x}")
    state.set_service(key(i), [ServicePort(spn, cluster_ips, 80, node_port=node_port)])


def set_endpoints(state: ClusterState, i: int, count: int, family: int = 4) -> None:
    ips = [f"10.{128 + j}.{i // 256}.{i % 256}" for j in range(count)]
    if family == 6:
        ips = [f"fd00:128::{i:x}:{j}" for j in range(count)]
    state.set_slice(
        EndpointSliceInfo(
            key=NamespacedName("bench", f"svc-{i:03}-v{family}"),
            service=key(i),
            address_type=f"IPv{family}",
            ports=(EndpointSlicePort("http", 8080, Protocol.TCP),),
            endpoints=tuple(Endpoint(ip, 0, node_name="other") for ip in ips),
        )
    )


def assert_cached_equals_fresh(state: ClusterState, caches: dict[int, PlanCache]) -> None:
    services, endpoints = state.services_map(), state.endpoints_map()
    for family, cache in caches.items():
        cached = plan_ruleset(services, endpoints, NODE, CONFIG, family, cache)
        fresh = plan_ruleset(services, endpoints, NODE, CONFIG, family)
        assert cached == fresh


def test_a_patched_plan_crossing_the_large_cluster_threshold_equals_a_fresh_one() -> None:
    state, caches = ClusterState(), {4: PlanCache(), 6: PlanCache()}
    services = LARGE_CLUSTER_ENDPOINTS // 5
    for i in range(services):
        set_service(state, i)
        set_endpoints(state, i, 5)
    assert_cached_equals_fresh(state, caches)
    set_endpoints(state, 7, 6)  # 1,001 IPv4 endpoints: comments go
    assert_cached_equals_fresh(state, caches)
    set_endpoints(state, 7, 5)
    assert_cached_equals_fresh(state, caches)
    set_endpoints(state, 9, 2, family=6)  # IPv6 endpoints count in the IPv6 family only
    assert_cached_equals_fresh(state, caches)


def test_each_of_many_small_changes_plans_what_a_fresh_plan_does() -> None:
    rnd = random.Random(22)
    state, caches = ClusterState(), {4: PlanCache(), 6: PlanCache()}
    for i in range(300):
        set_service(state, i)
        set_endpoints(state, i, rnd.randint(0, 3))
    assert_cached_equals_fresh(state, caches)
    for _ in range(40):
        i = rnd.randrange(320)  # some beyond the first 300: new services
        what = rnd.choice(["endpoints", "v6 endpoints", "nodeport", "delete", "add"])
        if what == "endpoints":
            set_endpoints(state, i, rnd.randint(0, 4))
        elif what == "v6 endpoints":
            set_endpoints(state, i, rnd.randint(0, 2), family=6)
        elif what == "nodeport":
            set_service(state, i, node_port=30000 + i)
        elif what == "delete" and key(i) in state.service_keys():
            state.delete_service(key(i))
        else:
            set_service(state, i)
        assert_cached_equals_fresh(state, caches)


def test_an_unchanged_state_plans_the_same_ruleset_again() -> None:
    state, cache = ClusterState(), PlanCache()
    for i in range(10):
        set_service(state, i)
        set_endpoints(state, i, 2)
    services, endpoints = state.services_map(), state.endpoints_map()
    first = plan_ruleset(services, endpoints, NODE, CONFIG, 4, cache)
    assert plan_ruleset(services, endpoints, NODE, CONFIG, 4, cache) == first
    other = NodeInfo("node-b", local_addresses=("192.168.1.10",))  # a new context: replanned
    assert plan_ruleset(services, endpoints, other, CONFIG, 4, cache) == plan_ruleset(
        services, endpoints, other, CONFIG, 4
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(clusters(), min_size=1, max_size=3))
def test_the_rules_counted_while_planning_are_the_plans_rules(steps: list[Scenario]) -> None:
    state = ClusterState()
    planners: dict[ProxyConfig, IptablesPlanner] = {}
    for step in steps:
        move_to(state, step)
        planner = planners.setdefault(step.config, IptablesPlanner(step.config))
        plan = planner.plan(state.services_map(), state.endpoints_map(), step.node, (4, 6))
        assert plan.stats.rules == count_rules(plan.kernel)


def test_a_plan_that_failed_half_way_leaves_no_half_patched_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state, caches = ClusterState(), {4: PlanCache()}
    for i in range(100):
        set_service(state, i)
        set_endpoints(state, i, 2)
    assert_cached_equals_fresh(state, caches)
    planned = kept.plan_service_port
    calls: list[int] = []

    def fails_second(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("half-way")
        planned(*args)

    monkeypatch.setattr(kept, "plan_service_port", fails_second)
    set_endpoints(state, 3, 3)
    other = NodeInfo("node-b")  # a new context: every port is planned again, and one fails
    with pytest.raises(RuntimeError):
        plan_ruleset(state.services_map(), state.endpoints_map(), other, CONFIG, 4, caches[4])
    monkeypatch.setattr(kept, "plan_service_port", planned)
    set_endpoints(state, 60, 1)
    services, endpoints = state.services_map(), state.endpoints_map()
    cached = plan_ruleset(services, endpoints, other, CONFIG, 4, caches[4])
    assert cached == plan_ruleset(services, endpoints, other, CONFIG, 4)
