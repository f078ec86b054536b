"""ServiceCIDR objects: into the state (list, watch events, bad values), carried with the node to
the planner, and the nftables mode's `cluster-ips-check` as upstream builds it: an unknown port of
a ClusterIP is rejected, another address of the ServiceCIDRs dropped, and with no ServiceCIDRs
there is no range to check."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
import scenarios
from kubernetes.client.exceptions import ApiException
from structlog.testing import capture_logs

from kproxy.inspect.trace_cmd import TraceRequest, trace_planned
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.render import render_nft_table
from kproxy.plan.nftables.table import plan_nft_table
from kproxy.rules.explain import Outcome
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import Mutation, service_cidr_event, set_service_cidrs
from kproxy.watch.api import Reflector, Resource
from kproxy.watch.supervisor import Supervisor

POD = "10.99.0.7"


def service_cidr(name: str, *cidrs: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }


def state_with_node() -> ClusterState:
    state = ClusterState()
    state.node = NodeInfo(scenarios.NODE)
    return state


def test_listed_and_watched_service_cidrs_ride_with_the_node() -> None:
    state = state_with_node()
    mutation = set_service_cidrs(
        [
            service_cidr("kubernetes", "172.30.0.0/16", "fd00:30::/112"),
            service_cidr("extra", "10.1.0.0/24"),
        ]
    )
    assert mutation.kinds == {Kind.SERVICE_CIDR}
    assert mutation(state) == []
    assert state.node is not None
    assert state.node.service_cidrs == ("10.1.0.0/24", "172.30.0.0/16", "fd00:30::/112")
    service_cidr_event("MODIFIED", service_cidr("extra", "10.2.0.0/24"))(state)
    service_cidr_event("DELETED", service_cidr("kubernetes"))(state)
    assert state.node.service_cidrs == ("10.2.0.0/24",)
    set_service_cidrs([])(state)  # a relist that finds none
    assert state.node.service_cidrs == ()


def test_a_bad_cidr_is_left_out_with_one_warning_naming_object_and_field() -> None:
    state = state_with_node()
    errors = set_service_cidrs([service_cidr("kubernetes", "172.30.0.0/16", "not-a-cidr")])(state)
    assert [(e.obj, e.field) for e in errors] == [("ServiceCIDR kubernetes", "spec.cidrs[1]")]
    assert state.node is not None and state.node.service_cidrs == ("172.30.0.0/16",)
    broken = service_cidr_event("ADDED", {"metadata": {"name": "x"}, "spec": {"cidrs": "10/8"}})
    assert [e.field for e in broken(state)] == ["spec.cidrs"]
    assert state.node.service_cidrs == ("172.30.0.0/16",)


def _with_cidrs(*cidrs: str) -> scenarios.Scenario:
    scenario = scenarios.single_service()
    node = replace(
        scenario.node,
        local_addresses=(scenarios.NODE_IP, "127.0.0.1"),
        service_cidrs=cidrs,
    )
    return replace(scenario, node=node, config=replace(scenario.config, mode="nftables"))


def _check_chain(scenario: scenarios.Scenario, family: int = 4) -> str:
    state = scenario.state()
    table = plan_nft_table(
        state.services_map(), state.endpoints_map(), scenario.node, scenario.config, family
    ).table
    text = render_nft_table(table)
    return text[text.index(f"chain {n.CLUSTER_IPS_CHECK} {{") :].split("}", 1)[0]


def test_cluster_ips_check_drops_the_service_cidrs_of_its_family() -> None:
    scenario = _with_cidrs("172.30.0.0/16", "fd00:30::/112")
    chain = _check_chain(scenario)
    assert "ip daddr @cluster-ips reject" in chain
    assert 'ip daddr 172.30.0.0/16 drop comment "Drop traffic to unallocated ClusterIPs"' in chain
    assert "fd00:30::" not in chain
    assert "ip6 daddr fd00:30::/112 drop" in _check_chain(scenario, family=6)


def test_without_service_cidrs_there_is_no_range_to_check() -> None:
    chain = _check_chain(_with_cidrs())
    assert "ip daddr @cluster-ips reject" in chain
    assert "drop" not in chain


def _trace(scenario: scenarios.Scenario, dest: str, source: str | None = POD) -> Outcome:
    request = TraceRequest("tcp", dest, source) if source else TraceRequest("tcp", dest)
    return trace_planned(request, scenario.state(), scenario.node, scenario.config).outcome


def test_unallocated_cluster_ip_is_dropped_allocated_one_works() -> None:
    scenario = _with_cidrs("172.30.0.0/16")
    for source in (POD, None):  # through a pod (forward) and from the node (output)
        assert _trace(scenario, "172.30.0.41:80", source) is Outcome.DNAT
        assert _trace(scenario, "172.30.0.41:81", source) is Outcome.REJECTED
        assert _trace(scenario, "172.30.9.9:80", source) is Outcome.DROPPED
        assert _trace(scenario, "172.31.0.1:80", source) is Outcome.UNTOUCHED
    assert _trace(_with_cidrs(), "172.30.9.9:80") is Outcome.UNTOUCHED


class _Sink:
    def __init__(self) -> None:
        self.state = state_with_node()
        self.synced_kinds: list[Kind] = []

    def apply(self, mutation: Mutation) -> None:
        mutation(self.state)

    def synced(self, kind: Kind) -> None:
        self.synced_kinds.append(kind)


@pytest.mark.parametrize("status", [403, 404])
def test_a_cluster_without_the_resource_reads_as_no_service_cidrs(status: int) -> None:
    """An API server without networking.k8s.io/v1 ServiceCIDRs (before 1.33 without the
    feature) or an old ClusterRole: no range to check, said once, and the source stays healthy."""

    def refuse(**_: Any) -> None:
        raise ApiException(status=status, reason="Not Found" if status == 404 else "Forbidden")

    sink = _Sink()
    set_service_cidrs([service_cidr("kubernetes", "172.30.0.0/16")])(sink.state)
    resource = Resource(
        Kind.SERVICE_CIDR, refuse, {}, set_service_cidrs, service_cidr_event, optional=True
    )
    stop = threading.Event()
    stop.set()  # the wait before asking again returns at once
    supervisor = Supervisor("watch-ServiceCIDR", lambda s: None, stop)
    reflector = Reflector(resource, sink)
    with capture_logs() as logs:
        reflector.run(supervisor)
        reflector.run(supervisor)
    assert sink.state.node is not None and sink.state.node.service_cidrs == ()
    assert sink.synced_kinds == [Kind.SERVICE_CIDR, Kind.SERVICE_CIDR]
    assert supervisor.problem(timeout=60.0) is None
    assert [e["event"] for e in logs] == ["resource_unavailable"]
    assert logs[0]["kind"] == "ServiceCIDR" and logs[0]["status"] == status
