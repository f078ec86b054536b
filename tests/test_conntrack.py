from kproxy.model.endpoint import Endpoint
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.conntrack import Flow, serving_sources, stale_flows, with_removed

DNS = ServicePortName(NamespacedName("kube-system", "kube-dns"), "dns", Protocol.UDP)
DNS_TCP = ServicePortName(NamespacedName("kube-system", "kube-dns"), "dns-tcp", Protocol.TCP)


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


def test_flows_to_gone_or_unserving_endpoints_are_stale() -> None:
    flows = [
        Flow("10.96.0.10", 53, "10.244.1.5"),  # current endpoint: kept
        Flow("10.96.0.10", 53, "10.244.2.5"),  # terminating but serving: kept
        Flow("10.96.0.10", 53, "10.244.3.5"),  # not serving: stale
        Flow("10.96.0.10", 53, "10.244.7.7"),  # endpoint removed: stale
        Flow("10.96.0.10", 53, "10.96.0.10"),  # began before any DNAT rule: stale
        Flow("192.0.2.9", 53, "10.244.7.7"),  # external IP: stale
        Flow("172.31.0.2", 30053, "10.244.7.7"),  # NodePort on a node address: stale
        Flow("10.96.0.11", 53, "10.244.7.7"),  # not a service address: kept
    ]
    stale = stale_flows(flows, allowed())
    assert [(f.orig_dst, f.orig_dport, f.reply_src) for f in stale] == [
        ("10.96.0.10", 53, "10.244.3.5"),
        ("10.96.0.10", 53, "10.244.7.7"),
        ("10.96.0.10", 53, "10.96.0.10"),
        ("192.0.2.9", 53, "10.244.7.7"),
        ("172.31.0.2", 30053, "10.244.7.7"),
    ]


def test_only_the_udp_ports_endpoints_count_as_serving() -> None:
    assert ("10.96.0.10", 53) in allowed()
    assert allowed()[("10.96.0.10", 53)] == frozenset({"10.244.1.5", "10.244.2.5"})
    assert stale_flows([Flow("10.96.0.10", 53, "10.244.9.9")], allowed()) != []


def test_flows_to_a_removed_udp_service_are_stale_whatever_answers() -> None:
    before = allowed()
    now = {key: sources for key, sources in before.items() if key != ("10.96.0.10", 53)}
    flows = [Flow("10.96.0.10", 53, "10.244.1.5"), Flow("192.0.2.9", 53, "10.244.1.5")]
    assert stale_flows(flows, now) == []  # forgotten: nobody would delete them
    stale = stale_flows(flows, with_removed(before, now))
    assert [(f.orig_dst, f.reply_src) for f in stale] == [("10.96.0.10", "10.244.1.5")]
