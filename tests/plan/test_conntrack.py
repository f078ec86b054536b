from kproxy.model.endpoint import Endpoint
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.conntrack import (
    FlowQuery,
    UdpServing,
    is_stale,
    plan_cleanup,
    plan_queries,
    serving_sources,
    with_cleaned,
)

DNS = ServicePortName(NamespacedName("kube-system", "kube-dns"), "dns", Protocol.UDP)
DNS_TCP = ServicePortName(NamespacedName("kube-system", "kube-dns"), "dns-tcp", Protocol.TCP)
NONE = frozenset[str]()


def allowed() -> dict[tuple[str, int], frozenset[str]]:
    services = {
        DNS: ServicePort(DNS, ("10.96.0.10",), 53, node_port=30053, external_ips=("192.0.2.9",)),
        DNS_TCP: ServicePort(DNS_TCP, ("10.96.0.10",), 53),
    }
    endpoints = {
        DNS: (
            Endpoint("10.244.1.5", 53),
            Endpoint("10.244.2.5", 53, ready=False, serving=True, terminating=True),
            Endpoint("10.244.3.5", 53, ready=False, serving=False),
        ),
        DNS_TCP: (Endpoint("10.244.9.9", 53),),
    }
    return serving_sources(services, endpoints, 4)


def stale(flows: list[tuple[str, int, str]], work: UdpServing, serving: UdpServing) -> list:
    return [flow for flow in flows if is_stale(*flow, work, serving)]


def test_flows_to_gone_or_unserving_endpoints_are_stale() -> None:
    flows = [
        ("10.96.0.10", 53, "10.244.1.5"),  # current endpoint: kept
        ("10.96.0.10", 53, "10.244.2.5"),  # terminating but serving: kept
        ("10.96.0.10", 53, "10.244.3.5"),  # not serving: stale
        ("10.96.0.10", 53, "10.244.7.7"),  # endpoint removed: stale
        ("10.96.0.10", 53, "10.96.0.10"),  # began before any DNAT rule: stale
        ("192.0.2.9", 53, "10.244.7.7"),  # external IP: stale
        ("172.31.0.2", 30053, "10.244.7.7"),  # NodePort on a node address: stale
        ("10.96.0.11", 53, "10.244.7.7"),  # not a service address: kept
    ]
    now = allowed()
    assert stale(flows, plan_cleanup({}, now), now) == [
        ("10.96.0.10", 53, "10.244.3.5"),
        ("10.96.0.10", 53, "10.244.7.7"),
        ("10.96.0.10", 53, "10.96.0.10"),
        ("192.0.2.9", 53, "10.244.7.7"),
        ("172.31.0.2", 30053, "10.244.7.7"),
    ]


def test_only_the_udp_ports_endpoints_count_as_serving() -> None:
    now = allowed()
    assert now[("10.96.0.10", 53)] == frozenset({"10.244.1.5", "10.244.2.5"})
    assert is_stale("10.96.0.10", 53, "10.244.9.9", now, now)


def test_only_addresses_whose_sources_changed_are_cleaned_and_removed_ones_lose_all() -> None:
    before = allowed()
    assert plan_cleanup(before, before) == {}
    now = dict(before)
    del now[("10.96.0.10", 53)]
    now[("192.0.2.9", 53)] = frozenset({"10.244.1.5"})
    work = plan_cleanup(before, now)
    assert work == {("10.96.0.10", 53): NONE, ("192.0.2.9", 53): frozenset({"10.244.1.5"})}
    flows = [("10.96.0.10", 53, "10.244.1.5"), ("192.0.2.9", 53, "10.244.2.5")]
    assert stale(flows, work, now) == flows
    # Cleaned keys are remembered as cleaned against `now`; a removed one is forgotten.
    assert with_cleaned(before, now, work) == now
    assert (
        with_cleaned(before, now, [("192.0.2.9", 53)])[("10.96.0.10", 53)]
        == before[("10.96.0.10", 53)]
    )


def test_a_flow_to_another_served_address_on_a_nodeports_port_is_not_the_nodeports() -> None:
    serving = {("*", 30053): frozenset({"10.244.1.5"}), ("10.96.0.20", 30053): frozenset({"x"})}
    work = {("*", 30053): NONE}
    assert is_stale("172.31.0.2", 30053, "10.244.1.5", work, serving)
    assert not is_stale("10.96.0.20", 30053, "10.244.1.5", work, serving)
    # So the NodePort's flows are read and picked, not flushed by port.
    assert plan_queries(work, serving, 4, can_flush=True) == [
        FlowQuery(30053, None, (("*", 30053),), flush=False)
    ]


def test_queries_filter_ipv4_on_the_address_and_flush_what_nothing_may_answer() -> None:
    work = {
        ("10.96.0.10", 53): NONE,
        ("10.96.0.11", 53): frozenset({"10.244.1.5"}),
        ("*", 30053): NONE,
    }
    assert plan_queries(work, {}, 4, can_flush=True) == [
        FlowQuery(30053, None, (("*", 30053),), flush=True),
        FlowQuery(53, "10.96.0.10", (("10.96.0.10", 53),), flush=True),
        FlowQuery(53, "10.96.0.11", (("10.96.0.11", 53),), flush=False),
    ]
    # A kernel that cannot delete by filter (before 6.12): read and delete one by one.
    assert not any(q.flush for q in plan_queries(work, {}, 4, can_flush=False))


def test_ipv6_queries_filter_on_the_port_alone() -> None:
    work = {("fd00::10", 53): NONE, ("fd00::11", 53): frozenset({"fd00:244::5"})}
    assert plan_queries(work, {}, 6, can_flush=True) == [
        FlowQuery(53, None, (("fd00::10", 53), ("fd00::11", 53)), flush=False)
    ]
    assert plan_queries({("*", 30053): NONE}, {}, 6, can_flush=True) == [
        FlowQuery(30053, None, (("*", 30053),), flush=True)
    ]
