"""Issue 18 D4: values the API server accepts, however odd, are programmed as kube-proxy programs
them. The quirks were read from upstream's API validation (pkg/apis/core/validation,
pkg/apis/discovery/validation) and kube-proxy's service and EndpointSlice conversion; each case
names what it follows. Issue 19: load-balancer ingress IPs that are special addresses get no
rules, with one warning naming the object and the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kproxy.model.config import ProxyConfig
from kproxy.model.convert import build_endpoint_slice, build_node, build_service
from kproxy.model.node import NodeInfo
from kproxy.model.service import Protocol
from kproxy.plan.iptables.planner import IptablesPlanner
from kproxy.rules.render import render_ruleset
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import set_node, update_endpoint_slice, update_service

Obj = dict[str, Any]


def lb_service(**spec: Any) -> Obj:
    """A LoadBalancer as a cloud controller leaves it; `status` replaces its ingress list."""
    status = spec.pop("status", [{"ip": "198.51.100.7", "ipMode": "VIP"}])
    base: Obj = {
        "type": "LoadBalancer",
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10"],
        "ipFamilies": ["IPv4"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}],
        "sessionAffinity": "None",
        "externalTrafficPolicy": "Cluster",
    }
    base.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {k: v for k, v in base.items() if v is not None},
        "status": {"loadBalancer": {"ingress": status}},
    }


def one_port(obj: Obj) -> Any:
    info = build_service(obj)
    assert info.skipped == (), info.skipped
    (port,) = info.ports
    return port


# --- Services: accepted as the API server accepts them, read as kube-proxy reads them


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        # The API trims each range before checking it; kube-proxy trims it too (upstream keeps
        # a regression test for a leading space).
        ([" 203.0.113.0/25"], ("203.0.113.0/25",)),
        (["203.0.113.0/25 ", "\t192.0.2.0/24\n"], ("203.0.113.0/25", "192.0.2.0/24")),
        # Host bits set: Go's ParseCIDR masks them.
        (["203.0.113.7/24"], ("203.0.113.0/24",)),
        # Leading zeros, in legacy objects the API still holds: decimal, as Go's sloppy parser.
        (["010.000.000.000/8"], ("10.0.0.0/8",)),
        (["2001:db8::/32", " 192.0.2.0/24"], ("2001:db8::/32", "192.0.2.0/24")),
        (["192.0.2.0/24", "192.0.2.0/24"], ("192.0.2.0/24",)),
    ],
)
def test_source_ranges_are_read_as_kube_proxy_reads_them(
    ranges: list[str], expected: tuple[str, ...]
) -> None:
    port = one_port(lb_service(loadBalancerSourceRanges=ranges))
    assert port.load_balancer_source_ranges == expected


def test_a_padded_source_range_firewalls_the_load_balancer() -> None:
    state = ClusterState()
    assert update_service(state, lb_service(loadBalancerSourceRanges=[" 203.0.113.0/25"])) == []
    update_endpoint_slice(state, slice_([{"addresses": ["10.0.0.1"]}]))
    text = render_ruleset(
        IptablesPlanner(ProxyConfig())
        .plan(state.services_map(), state.endpoints_map(), NodeInfo(name="n"), (4,))
        .kernel[4]
    )
    assert "-A KUBE-SERVICES -d 10.96.0.10/32" in text  # the service is programmed at all
    assert "-s 203.0.113.0/25" in text


@pytest.mark.parametrize(
    ("spec", "attribute", "expected"),
    [
        # Legacy leading zeros and IPv4-mapped IPv6: what Go's sloppy parser makes of them.
        ({"clusterIP": "010.096.000.010", "clusterIPs": None}, "cluster_ips", ("10.96.0.10",)),
        ({"externalIPs": ["192.000.002.010"]}, "external_ips", ("192.0.2.10",)),
        ({"externalIPs": ["::ffff:192.0.2.10"]}, "external_ips", ("192.0.2.10",)),
        ({"status": [{"ip": "198.051.100.007"}]}, "load_balancer_ips", ("198.51.100.7",)),
        # The API does not refuse duplicates; kube-proxy writes the same rule per copy.
        ({"externalIPs": ["192.0.2.10", "192.0.2.10"]}, "external_ips", ("192.0.2.10",)),
        # No ipFamilies (objects from before dual-stack): clusterIP, or clusterIPs, decides.
        ({"ipFamilies": None, "clusterIPs": None}, "cluster_ips", ("10.96.0.10",)),
        (
            {"ipFamilies": None, "clusterIPs": ["10.96.0.10", "fd00:96::10"]},
            "cluster_ips",
            ("10.96.0.10", "fd00:96::10"),
        ),
        # An ingress without ipMode is VIP; a hostname-only one or a Proxy one is not ours.
        ({"status": [{"ip": "198.51.100.7"}]}, "load_balancer_ips", ("198.51.100.7",)),
        (
            {"status": [{"hostname": "lb.example"}, {"ip": "198.51.100.8", "ipMode": "Proxy"}]},
            "load_balancer_ips",
            (),
        ),
        # An ingress of the other family is kept; each family's plan takes its own.
        ({"status": [{"ip": "2001:db8::7"}]}, "load_balancer_ips", ("2001:db8::7",)),
        # nodePort 0 is no node port; a healthCheckNodePort the API never allocated is none.
        (
            {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 0}]},
            "node_port",
            0,
        ),
        ({"externalTrafficPolicy": "Local"}, "health_check_node_port", 0),
        ({"externalTrafficPolicy": ""}, "external_policy_local", False),
        # ClientIP affinity without a timeout: kube-proxy's default of three hours.
        ({"sessionAffinity": "ClientIP"}, "session_affinity_seconds", 10800),
    ],
)
def test_api_valid_service_quirks(spec: Obj, attribute: str, expected: Any) -> None:
    assert getattr(one_port(lb_service(**spec)), attribute) == expected


@pytest.mark.parametrize(
    "ports",
    [
        # A port name is a DNS-1123 label (63 characters, digits alone allowed), not an
        # IANA_SVC_NAME (15 characters, a letter): that rule is for targetPort names.
        [{"name": "metrics-exporter-https", "port": 9443}],
        [{"name": "8080", "port": 8080}, {"name": "x" * 63, "port": 8081}],
        # targetPort by name or number, and any appProtocol, are the endpoints' business.
        [{"name": "h", "port": 80, "targetPort": "http-alt", "appProtocol": "kubernetes.io/h2c"}],
        [{"port": 80, "targetPort": "8080", "appProtocol": "My.Example/custom proto"}],
        [{"port": 80, "protocol": "SCTP"}],
    ],
)
def test_api_valid_port_quirks(ports: list[Obj]) -> None:
    obj = lb_service(type="ClusterIP", ports=ports, externalTrafficPolicy=None, status=[])
    info = build_service(obj)
    assert [p.port for p in info.ports] == [p["port"] for p in ports]
    assert [p.name.port for p in info.ports] == [p.get("name", "") for p in ports]
    assert info.skipped == ()


EXTERNAL_NAME = {
    "type": "ExternalName",
    "externalName": "db.example.com",
    "clusterIP": None,
    "clusterIPs": None,
}


@pytest.mark.parametrize(
    "spec",
    [
        # Headless: no ports needed, clusterIP "None" in either field.
        {"clusterIP": "None", "clusterIPs": ["None"], "ports": [], "type": "ClusterIP"},
        {"clusterIP": "None", "clusterIPs": None, "ports": None, "type": "ClusterIP"},
        # ExternalName: no clusterIP, ports optional; never proxied.
        {**EXTERNAL_NAME, "ports": None},
        EXTERNAL_NAME,
    ],
)
def test_services_kube_proxy_does_not_proxy_are_accepted_quietly(spec: Obj) -> None:
    info = build_service(lb_service(status=[], externalTrafficPolicy=None, **spec))
    assert info.ports == () and info.skipped == ()


# --- bad values that kube-proxy filters cost only themselves


@pytest.mark.parametrize(
    ("spec", "attribute", "kept", "field"),
    [
        (
            {"loadBalancerSourceRanges": ["203.0.113.0/25", "10.0.0.0/255.0.0.0"]},
            "load_balancer_source_ranges",
            ("203.0.113.0/25",),
            "spec.loadBalancerSourceRanges[1]",
        ),
        (
            {"loadBalancerSourceRanges": ["10.0.0.0/33"]},
            "load_balancer_source_ranges",
            (),
            "spec.loadBalancerSourceRanges[0]",
        ),
        (
            {"externalIPs": ["192.0.2.10", "not-an-ip"]},
            "external_ips",
            ("192.0.2.10",),
            "spec.externalIPs[1]",
        ),
        ({"externalIPs": [7]}, "external_ips", (), "spec.externalIPs[0]"),
        ({"externalIPs": ["127.0.0.1"]}, "external_ips", (), "spec.externalIPs[0]"),
        ({"externalIPs": ["239.1.2.3"]}, "external_ips", (), "spec.externalIPs[0]"),
        (
            {"status": [{"ip": "198.51.100.7", "ipMode": "Tunnel"}, {"ip": "198.51.100.8"}]},
            "load_balancer_ips",
            ("198.51.100.8",),
            "status.loadBalancer.ingress[0].ipMode",
        ),
        (
            {"status": [{"ip": "lb.example"}]},
            "load_balancer_ips",
            (),
            "status.loadBalancer.ingress[0].ip",
        ),
    ],
)
def test_a_bad_list_value_is_left_out_with_one_warning(
    spec: Obj, attribute: str, kept: tuple[str, ...], field: str
) -> None:
    info = build_service(lb_service(**spec))
    (port,) = info.ports
    assert getattr(port, attribute) == kept
    (warning,) = info.skipped
    assert (warning.obj, warning.field) == ("Service shop/web", field)
    assert "ignored" in warning.problem


def test_update_service_returns_the_warnings_and_keeps_the_service() -> None:
    state = ClusterState()
    obj = lb_service(loadBalancerSourceRanges=["bad", " 192.0.2.0/24"], externalIPs=["x"])
    errors = update_service(state, obj)
    assert [e.field for e in errors] == ["spec.externalIPs[0]", "spec.loadBalancerSourceRanges[0]"]
    (port,) = state.services_map().values()
    assert port.load_balancer_source_ranges == ("192.0.2.0/24",)


# --- issue 19: special load-balancer ingress IPs


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "127.1.2.3",
        "0.0.0.0",
        "169.254.169.254",
        "224.0.0.1",
        "239.1.2.3",
        "::",
        "::1",
        "fe80::1",
        "ff02::1",
        "ff05::2",
        "::ffff:127.0.0.1",
    ],
)
def test_a_special_ingress_ip_gets_no_rule_and_one_warning(ip: str) -> None:
    status = [{"ip": "198.51.100.7", "ipMode": "VIP"}, {"ip": ip, "ipMode": "VIP"}]
    info = build_service(lb_service(status=status))
    (port,) = info.ports
    assert port.load_balancer_ips == ("198.51.100.7",)
    (warning,) = info.skipped
    assert (warning.obj, warning.field) == ("Service shop/web", "status.loadBalancer.ingress[1].ip")
    assert ip in warning.problem or ip.startswith("::ffff:")


def test_a_special_ingress_ip_in_proxy_mode_is_not_ours_and_not_warned_about() -> None:
    info = build_service(lb_service(status=[{"ip": "127.0.0.1", "ipMode": "Proxy"}]))
    (port,) = info.ports
    assert port.load_balancer_ips == () and info.skipped == ()


def test_special_ingress_ips_render_no_rule() -> None:
    state = ClusterState()
    status = [{"ip": ip} for ip in ("127.0.0.1", "0.0.0.0", "169.254.169.254", "198.51.100.7")]
    update_service(state, lb_service(status=status))
    text = render_ruleset(
        IptablesPlanner(ProxyConfig())
        .plan(state.services_map(), {}, NodeInfo(name="n"), (4,))
        .kernel[4]
    )
    assert "198.51.100.7" in text
    for ip in ("127.0.0.1/32", "0.0.0.0/32", "169.254.169.254"):
        assert ip not in text


# --- EndpointSlices


def slice_(endpoints: list[Obj], ports: list[Obj] | None = None) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abc12",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": endpoints,
    }


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        # kube-proxy: ready and serving when unset, terminating only when true.
        (None, (True, True, False)),
        ({}, (True, True, False)),
        ({"ready": None, "serving": None, "terminating": None}, (True, True, False)),
        ({"ready": False}, (False, True, False)),
        ({"ready": False, "terminating": True}, (False, True, True)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
        ({"ready": False, "serving": False, "terminating": True}, (False, False, True)),
        # Combinations no controller writes, which the API accepts: taken as they are.
        ({"ready": True, "serving": False}, (True, False, False)),
        ({"ready": True, "terminating": True}, (True, True, True)),
    ],
)
def test_endpoint_conditions_are_read_as_kube_proxy_reads_them(
    conditions: Obj | None, expected: tuple[bool, bool, bool]
) -> None:
    endpoint: Obj = {"addresses": ["10.0.0.1"]}
    if conditions is not None:
        endpoint["conditions"] = conditions
    info = build_endpoint_slice(slice_([endpoint]))
    assert info is not None
    (ep,) = info.endpoints
    assert (ep.ready, ep.serving, ep.terminating) == expected


def test_api_valid_slice_quirks() -> None:
    ports = [
        # No number, or 0: kube-proxy ignores the port; the API checks neither.
        {"name": "none", "protocol": "TCP"},
        {"name": "zero", "port": 0, "protocol": "TCP"},
        # No name is the unnamed port; appProtocol is free text to kube-proxy.
        {"port": 8080, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
        {"name": "metrics-exporter-https", "port": 9443, "protocol": "UDP"},
    ]
    endpoints = [
        # Several addresses: kube-proxy uses the first. Legacy leading zeros are decimal.
        {"addresses": ["010.000.000.001", "10.0.0.99"], "nodeName": "n1", "zone": "z"},
        {"addresses": ["::ffff:10.0.0.2"], "topology": {"kubernetes.io/hostname": "n2"}},
    ]
    info = build_endpoint_slice(slice_(endpoints, ports))
    assert info is not None
    assert [(p.name, p.port, p.protocol) for p in info.ports] == [
        ("", 8080, Protocol.TCP),
        ("metrics-exporter-https", 9443, Protocol.UDP),
    ]
    assert [e.ip for e in info.endpoints] == ["10.0.0.1", "10.0.0.2"]
    assert info.skipped == ()


def test_a_slice_port_out_of_range_is_left_out_with_one_warning() -> None:
    ports = [{"name": "a", "port": 70000, "protocol": "TCP"}, {"name": "b", "port": 80}]
    info = build_endpoint_slice(slice_([{"addresses": ["10.0.0.1"]}], ports))
    assert info is not None
    assert [p.name for p in info.ports] == ["b"]
    assert [(e.obj, e.field) for e in info.skipped] == [
        ("EndpointSlice shop/web-abc12", "ports[0].port")
    ]


def test_the_quirk_corpus_reaches_the_endpoints_map() -> None:
    state = ClusterState()
    svc = lb_service(
        loadBalancerSourceRanges=[" 203.0.113.0/25"],
        ports=[{"name": "metrics-exporter-https", "port": 443, "protocol": "TCP"}],
    )
    assert update_service(state, svc) == []
    ports = [{"name": "metrics-exporter-https", "port": 9443, "protocol": "TCP"}]
    endpoint = {"addresses": ["010.000.000.001"], "conditions": {}}
    assert update_endpoint_slice(state, slice_([copy.deepcopy(endpoint)], ports)) == []
    ((name, eps),) = state.endpoints_map().items()
    assert str(name) == "shop/web:metrics-exporter-https"
    assert [str(e) for e in eps] == ["10.0.0.1:9443"]


def test_a_service_name_may_start_with_a_digit() -> None:
    # KEP-5311 (RelaxedServiceNameValidation): a DNS-1123 label; its slices follow.
    obj = lb_service()
    obj["metadata"]["name"] = "1web"
    assert [str(p.name) for p in build_service(obj).ports] == ["shop/1web:http"]
    slice_obj = slice_([{"addresses": ["10.0.0.1"]}])
    slice_obj["metadata"]["labels"]["kubernetes.io/service-name"] = "1web"
    info = build_endpoint_slice(slice_obj)
    assert info is not None and info.service.name == "1web"


def node(addresses: list[Obj], spec: Obj | None = None) -> Obj:
    return {
        "kind": "Node",
        "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "spec": spec or {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": addresses},
    }


def test_a_bad_node_address_costs_only_itself() -> None:
    # The API server does not check node addresses; kube-proxy skips one it cannot parse.
    addresses = [
        {"type": "InternalIP", "address": "not-an-ip"},
        {"type": "InternalIP", "address": "172.031.000.002"},
        {"type": "Hostname", "address": "node-1"},
    ]
    built = build_node(node(addresses))
    assert built.primary_ips == ("172.31.0.2",)
    assert built.zone == "z1" and built.pod_cidrs == ("10.244.1.0/24",)
    assert [(e.obj, e.field) for e in built.skipped] == [
        ("Node default/node-1", "status.addresses[0].address")
    ]
    state = ClusterState()
    (warning,) = set_node("node-1", [node(addresses)])(state)
    assert warning.field == "status.addresses[0].address"
    assert state.node is not None and state.node.primary_ips == ("172.31.0.2",)


def test_an_empty_pod_cidr_is_none() -> None:
    built = build_node(node([], {"podCIDR": ""}))
    assert built.pod_cidrs == () and built.skipped == ()


def test_source_ranges_are_trimmed_as_go_trims_them() -> None:
    ranges = ["\u00a0192.0.2.0/24\u3000", "\x1c198.51.100.0/24"]
    info = build_service(lb_service(loadBalancerSourceRanges=ranges))
    (port,) = info.ports
    # Go's TrimSpace keeps \x1c (Python's strip would not): the API server refuses that range.
    assert port.load_balancer_source_ranges == ("192.0.2.0/24",)
    assert [e.field for e in info.skipped] == ["spec.loadBalancerSourceRanges[1]"]


@pytest.mark.parametrize("ip", ["ff12::1", "ff32::fb"])
def test_link_local_multicast_as_go_sees_it_is_not_an_endpoint(ip: str) -> None:
    obj = slice_([{"addresses": [ip]}, {"addresses": ["fd00::2"]}])
    obj["addressType"] = "IPv6"
    info = build_endpoint_slice(obj)
    assert info is not None
    assert [e.ip for e in info.endpoints] == ["fd00::2"]
    assert [e.field for e in info.skipped] == ["endpoints[0].addresses[0]"]
