from kproxy.model.convert import EndpointSliceInfo, EndpointSlicePort
from kproxy.model.endpoint import Endpoint
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.endpoints import categorize_endpoints
from kproxy.state.cluster import ClusterState, build_endpoints_map

SVC = NamespacedName("default", "web")
HTTP = ServicePortName(SVC, "http", Protocol.TCP)


def slice_(name: str, *endpoints: Endpoint, port: int = 8080) -> EndpointSliceInfo:
    return EndpointSliceInfo(
        key=NamespacedName("default", name),
        service=SVC,
        address_type="IPv4",
        ports=(EndpointSlicePort("http", port, Protocol.TCP),),
        endpoints=endpoints,
    )


def test_endpoints_merge_across_slices_sorted_by_ip_port_string() -> None:
    eps = build_endpoints_map(
        [slice_("b", Endpoint("10.0.0.10", 0)), slice_("a", Endpoint("10.0.0.9", 0))]
    )
    # String order, as upstream: "10.0.0.10:8080" < "10.0.0.9:8080".
    assert [str(e) for e in eps[HTTP]] == ["10.0.0.10:8080", "10.0.0.9:8080"]


def test_target_port_comes_from_the_slice() -> None:
    eps = build_endpoints_map([slice_("a", Endpoint("10.0.0.1", 0), port=9376)])
    assert eps[HTTP][0].port == 9376


def test_duplicate_address_keeps_non_terminating_copy() -> None:
    old = Endpoint("10.0.0.1", 0, ready=False, serving=True, terminating=True)
    new = Endpoint("10.0.0.1", 0)
    eps = build_endpoints_map([slice_("a", old), slice_("b", new)])
    assert eps[HTTP] == (Endpoint("10.0.0.1", 8080),)


def test_ready_first_then_serving_terminating_fallback() -> None:
    ready = Endpoint("10.0.0.1", 80)
    terminating = Endpoint("10.0.0.2", 80, ready=False, serving=True, terminating=True)
    gone = Endpoint("10.0.0.3", 80, ready=False, serving=False, terminating=True)
    assert categorize_endpoints([ready, terminating, gone], "n1").cluster == (ready,)
    fallback = categorize_endpoints([terminating, gone], "n1")
    assert fallback.cluster == (terminating,) and fallback.has_any
    assert not categorize_endpoints([gone], "n1").has_any


def test_local_endpoints_are_those_on_this_node() -> None:
    here = Endpoint("10.0.0.1", 80, node_name="n1")
    there = Endpoint("10.0.0.2", 80, node_name="n2")
    cats = categorize_endpoints([here, there], "n1", uses_local=True)
    assert cats.local == (here,) and cats.reachable == (here, there)
    only_local = categorize_endpoints([here, there], "n1", uses_cluster=False, uses_local=True)
    assert only_local.reachable == (here,) and only_local.has_any


def test_local_policy_falls_back_to_local_terminating_endpoints() -> None:
    leaving = Endpoint("10.0.0.1", 80, node_name="n1", ready=False, terminating=True)
    remote = Endpoint("10.0.0.2", 80, node_name="n2")
    cats = categorize_endpoints([leaving, remote], "n1", uses_local=True)
    assert cats.local == (leaving,) and cats.cluster == (remote,)


def test_zone_hints_narrow_cluster_endpoints_only_when_all_ready_endpoints_have_them() -> None:
    a = Endpoint("10.0.0.1", 80, zone_hints=("z1",))
    b = Endpoint("10.0.0.2", 80, zone_hints=("z2",))
    unhinted = Endpoint("10.0.0.3", 80)
    assert categorize_endpoints([a, b], "n1", zone="z1").cluster == (a,)
    assert categorize_endpoints([a, b, unhinted], "n1", zone="z1").cluster == (a, b, unhinted)
    # No endpoint hinted for this node's zone: hints are ignored.
    assert categorize_endpoints([a, b], "n1", zone="z3").cluster == (a, b)


def test_node_hints_win_over_zone_hints() -> None:
    a = Endpoint("10.0.0.1", 80, zone_hints=("z1",), node_hints=("n1",))
    b = Endpoint("10.0.0.2", 80, zone_hints=("z1",), node_hints=("n2",))
    assert categorize_endpoints([a, b], "n1", zone="z1").cluster == (a,)


def test_changes_name_the_services_touched() -> None:
    state = ClusterState()
    port = ServicePort(HTTP, ("10.96.0.5",), 80)
    state.set_service(SVC, [port])
    state.set_slice(slice_("a", Endpoint("10.0.0.1", 0)))
    assert state.take_changes() == {SVC}
    state.set_service(SVC, [port])  # same content: no change
    assert state.take_changes() == set()
    state.delete_slice(NamespacedName("default", "a"))
    assert state.take_changes() == {SVC}
    assert state.endpoints_map() == {}


def test_the_maps_are_built_once_until_something_changes() -> None:
    state = ClusterState()
    svc = NamespacedName("default", "web")
    spn = ServicePortName(svc, "http", Protocol.TCP)
    state.set_service(svc, [ServicePort(spn, ("10.96.0.5",), 80)])
    state.set_slice(slice_("web-1", Endpoint("10.0.0.1", 0)))
    services, endpoints = state.services_map(), state.endpoints_map()
    state.take_changes()
    assert state.services_map() is services and state.endpoints_map() is endpoints
    state.set_slice(slice_("web-1", Endpoint("10.0.0.2", 0)))
    assert state.endpoints_map() is not endpoints
    assert [ep.ip for ep in state.endpoints_map()[spn]] == ["10.0.0.2"]
    state.delete_service(svc)
    assert state.services_map() == {}
