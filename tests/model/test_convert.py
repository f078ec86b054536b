from typing import Any

import pytest

from kproxy.errors import InvalidObjectError
from kproxy.model.convert import build_endpoint_slice, build_node, build_service_ports
from kproxy.model.service import Protocol


def service(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"clusterIP": "10.96.0.10", "ports": [{"port": 53, "protocol": "UDP"}]}
    base.update(spec)
    return {
        "kind": "Service",
        "metadata": {"name": "dns", "namespace": "kube-system"},
        "spec": base,
    }


def test_service_ports_carry_name_protocol_and_default_tcp() -> None:
    ports = build_service_ports(
        service(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "m", "port": 9153}])
    )
    assert [(str(p.name), p.protocol, p.port) for p in ports] == [
        ("kube-system/dns:dns", Protocol.UDP, 53),
        ("kube-system/dns:m", Protocol.TCP, 9153),
    ]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"clusterIP": "10.96.0.300"}, "spec.clusterIP"),
        ({"ports": [{"port": 70000}]}, "spec.ports[0].port"),
        ({"ports": [{"port": "http"}]}, "spec.ports[0].port"),
        ({"ports": [{"port": 53, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
        ({"ports": [{"port": 53, "nodePort": -1}]}, "spec.ports[0].nodePort"),
        (
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
            },
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ),
    ],
)
def test_invalid_service_names_object_and_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObjectError) as info:
        build_service_ports(service(**spec))
    assert info.value.obj == "Service kube-system/dns"
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize(
    "obj",
    [
        service(clusterIP="None"),
        service(clusterIP=""),
        service(type="ExternalName", clusterIP=""),
        {**service(), "metadata": {"name": "x", "labels": {"service.kubernetes.io/headless": ""}}},
        {
            **service(),
            "metadata": {"name": "x", "labels": {"service.kubernetes.io/service-proxy-name": "o"}},
        },
    ],
)
def test_services_upstream_does_not_proxy_give_no_ports(obj: dict[str, Any]) -> None:
    assert build_service_ports(obj) == []


def test_affinity_defaults_to_three_hours() -> None:
    (port,) = build_service_ports(service(sessionAffinity="ClientIP"))
    assert port.session_affinity_seconds == 10800


def slice_(endpoints: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": "EndpointSlice",
        "metadata": {
            "name": "dns-abc",
            "namespace": "kube-system",
            "labels": {"kubernetes.io/service-name": "dns"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": endpoints,
    }
    obj.update(extra)
    return obj


def test_slice_conditions_default_as_kube_proxy_reads_them() -> None:
    info = build_endpoint_slice(
        slice_(
            [
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "terminating": True}},
                {
                    "addresses": ["10.0.0.3"],
                    "conditions": {"ready": False, "serving": True, "terminating": True},
                },
            ]
        )
    )
    assert info is not None
    flags = [(e.ready, e.serving, e.terminating) for e in info.endpoints]
    # An unset serving condition is serving, even beside ready: false (kube-proxy's reading).
    assert flags == [(True, True, False), (False, True, True), (False, True, True)]
    assert info.ports[0].port == 5353


def test_slice_with_bad_address_skips_only_that_endpoint() -> None:
    info = build_endpoint_slice(
        slice_([{"addresses": ["10.0.0.999"]}, {"addresses": ["10.0.0.2"]}])
    )
    assert info is not None
    assert [e.ip for e in info.endpoints] == ["10.0.0.2"]
    (skipped,) = info.skipped
    assert skipped.obj == "EndpointSlice kube-system/dns-abc"
    assert skipped.field == "endpoints[0].addresses[0]"


def test_fqdn_and_unlabelled_slices_are_ignored() -> None:
    assert build_endpoint_slice(slice_([], addressType="FQDN")) is None
    unlabelled = slice_([])
    unlabelled["metadata"]["labels"] = {}
    assert build_endpoint_slice(unlabelled) is None


def test_node_zone_and_pod_cidrs() -> None:
    node = build_node(
        {
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
            "spec": {"podCIDRs": ["10.244.1.0/24"]},
        }
    )
    assert node.zone == "z1" and node.pod_cidrs == ("10.244.1.0/24",)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"ports": "eighty"}, "spec.ports"),
        ({"ports": [{"port": 53, "name": "a"}, {"port": 54, "name": "a"}]}, "spec.ports[1].name"),
        ({"ports": [{"port": 53}, {"port": 54}]}, "spec.ports[1].name"),
        ({"ports": [{"port": 53, "name": "Dns"}]}, "spec.ports[0].name"),
        ({"ports": [{"port": 53, "name": "a\nb"}]}, "spec.ports[0].name"),
        (
            {"sessionAffinity": "ClientIP", "sessionAffinityConfig": "x"},
            "spec.sessionAffinityConfig",
        ),
        ({"loadBalancerSourceRanges": 10}, "spec.loadBalancerSourceRanges"),
        ({"externalTrafficPolicy": "Sometimes"}, "spec.externalTrafficPolicy"),
        ({"internalTrafficPolicy": 1}, "spec.internalTrafficPolicy"),
        ({"type": ["ClusterIP"]}, "spec.type"),
        ({"clusterIP": "fe80::1%lo", "clusterIPs": ["fe80::1%lo"]}, "spec.clusterIPs[0]"),
        ({"clusterIPs": ["::10.0.0.1"]}, "spec.clusterIPs[0]"),
        ({"clusterIPs": ["127.0.0.1"]}, "spec.clusterIPs[0]"),
        ({"clusterIPs": ["0.0.0.0"]}, "spec.clusterIPs[0]"),
        ({"clusterIPs": ["169.254.169.254"]}, "spec.clusterIPs[0]"),
        ({"clusterIPs": ["10.96.0.1", "10.96.0.2"]}, "spec.clusterIPs"),
        ({"ports": [{"port": 53, "protocol": "udp"}]}, "spec.ports[0].protocol"),
    ],
)
def test_malformed_service_fields_are_named(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObjectError) as info:
        build_service_ports(service(**spec))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        (5, "metadata"),
        ({"name": "web\nx"}, "metadata.name"),
        ({"name": "\udc80web"}, "metadata.name"),
        ({"name": "-web"}, "metadata.name"),
        ({"name": "web.shop"}, "metadata.name"),
        ({"name": "web", "namespace": "shop\x00"}, "metadata.namespace"),
        ({"name": "web", "namespace": "Shop"}, "metadata.namespace"),
        ({"name": "web", "labels": ["a"]}, "metadata.labels"),
    ],
)
def test_names_are_checked_as_the_api_server_checks_them(metadata: Any, field: str) -> None:
    obj = {**service(), "metadata": metadata}
    with pytest.raises(InvalidObjectError) as info:
        build_service_ports(obj)
    assert info.value.field == field
    assert str(info.value).isprintable() and str(info.value).isascii()


def test_object_ref_is_printable_whatever_the_object_holds() -> None:
    for meta in [5, {"name": ["x"]}, {"name": "a\u2028b", "namespace": {"x": 1}}, None]:
        with pytest.raises(InvalidObjectError) as info:
            build_service_ports({"kind": ["Service"], "metadata": meta, "spec": {}})
        assert info.value.obj.startswith("Service ") and info.value.obj.isprintable()


def test_status_that_is_not_a_mapping_is_named() -> None:
    with pytest.raises(InvalidObjectError) as info:
        build_service_ports({**service(), "status": []})
    assert info.value.field == "status"


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        ({"addresses": ["10.0.0.1"], "conditions": {"ready": "false"}}, "conditions.ready"),
        ({"addresses": ["10.0.0.1"], "conditions": {"ready": 0}}, "conditions.ready"),
        ({"addresses": ["10.0.0.1"], "conditions": "true"}, "conditions"),
        ({"addresses": ["10.0.0.1"], "hints": {"forZones": "zone-a"}}, "hints.forZones"),
        ({"addresses": ["10.0.0.1"], "hints": {"forZones": ["zone-a"]}}, "hints.forZones[0]"),
        ({"addresses": ["127.0.0.1"]}, "addresses[0]"),
        ({"addresses": ["fd00::1"]}, "addresses[0]"),
        ({"addresses": "10.0.0.1"}, "addresses"),
    ],
)
def test_a_bad_endpoint_is_skipped_and_named(endpoint: dict[str, Any], field: str) -> None:
    info = build_endpoint_slice(slice_([endpoint, {"addresses": ["10.0.0.2"]}]))
    assert info is not None
    assert [e.ip for e in info.endpoints] == ["10.0.0.2"]
    assert [e.field for e in info.skipped] == [f"endpoints[0].{field}"]


def test_a_bad_slice_field_skips_the_slice() -> None:
    for extra, field in [({"ports": "x"}, "ports"), ({"endpoints": {"a": 1}}, "endpoints")]:
        with pytest.raises(InvalidObjectError) as info:
            build_endpoint_slice({**slice_([]), **extra})
        assert info.value.field == field
