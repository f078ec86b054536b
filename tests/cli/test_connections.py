"""`kproxy connections` without root: flows matched to service ports and endpoints (fake flows,
as the kernel dumps them), grouped, filtered, and a dumped TCP entry read into a Flow."""

from __future__ import annotations

import socket
import struct

import pytest

from kproxy.dataplane.ctflows import (
    TCP,
    Flow,
    _orig_addresses,
    decode_full_flow,
    protocol_filter_attrs,
)
from kproxy.dataplane.ctnetlink import UDP
from kproxy.inspect.connections_cmd import (
    ConnectionsInputError,
    build_index,
    connections_json,
    live_connections,
    parse_endpoint_ip,
    parse_service,
    render_connections,
    select_connections,
)
from kproxy.model.endpoint import Endpoint
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.state.cluster import ClusterState
from tests.dataplane.test_ctnetlink_encode import FLOWS, attr, kernel_entry

NODE = "172.31.0.2"
LOCAL = (NODE, "127.0.0.1")
WEB = ServicePortName(NamespacedName("default", "web"), "http", Protocol.TCP)
DNS = ServicePortName(NamespacedName("kube-system", "dns"), "", Protocol.UDP)
SERVICES = {
    WEB: ServicePort(WEB, ("10.96.0.10",), 80, node_port=30080, external_ips=("203.0.113.7",)),
    DNS: ServicePort(DNS, ("10.96.0.53",), 53),
}
ENDPOINTS = {
    WEB: (Endpoint("10.244.1.5", 8080), Endpoint("10.244.2.5", 8080)),
    DNS: (Endpoint("10.244.1.9", 53),),
}
INDEX = build_index(SERVICES, ENDPOINTS)


def flow(
    src: str, dst: str, dport: int, reply: str, rport: int, proto: int = TCP, id_: int = 1
) -> Flow:
    return Flow(proto, src, 40000 + id_, dst, dport, reply, rport, "ESTABLISHED", 100, None, id_)


def groups(conns: list) -> dict[tuple[str, str], list[str]]:
    doc = connections_json(conns, "iptables")
    return {
        (g["service"], g["endpoint"]): [f"{f['destination']} {f['via']}" for f in g["flows"]]
        for g in doc["groups"]
    }


KERNEL_FLOWS = [
    flow("10.244.3.3", "10.96.0.10", 80, "10.244.1.5", 8080, id_=1),
    flow("10.244.3.4", "10.96.0.10", 80, "10.244.2.5", 8080, id_=2),
    flow("192.0.2.9", NODE, 30080, "10.244.2.5", 8080, id_=3),
    flow("192.0.2.9", "203.0.113.7", 80, "10.244.1.5", 8080, id_=4),
    flow("10.244.3.3", "10.96.0.53", 53, "10.244.1.9", 53, proto=UDP, id_=5),
    flow("10.244.3.3", "10.96.0.53", 80, "10.244.1.9", 80, id_=6),  # no such port: not kproxy's
    flow("10.244.3.3", "10.244.1.5", 8080, "10.244.1.5", 8080, id_=7),  # pod to pod directly
    flow("192.0.2.9", "192.0.2.1", 30080, "192.0.2.1", 30080, id_=8),  # not a node address
]


def test_kernel_dnat_flows_group_by_service_and_the_endpoint_the_reply_comes_from() -> None:
    conns = select_connections(KERNEL_FLOWS, INDEX, LOCAL, userspace=False)
    assert groups(conns) == {
        ("default/web", "10.244.1.5:8080"): [
            "10.96.0.10:80 ClusterIP",
            "203.0.113.7:80 ExternalIP",
        ],
        ("default/web", "10.244.2.5:8080"): ["10.96.0.10:80 ClusterIP", f"{NODE}:30080 NodePort"],
        ("kube-system/dns", "10.244.1.9:53"): ["10.96.0.53:53 ClusterIP"],
    }
    assert {c.leg for c in conns} == {"direct"}
    text = render_connections(conns, "iptables")
    assert "default/web:http TCP -> 10.244.2.5:8080  (2 flows)" in text
    assert "kube-system/dns UDP -> 10.244.1.9:53  (1 flow)" in text


def test_endpoint_and_service_narrow_the_flows() -> None:
    to_one = select_connections(KERNEL_FLOWS, INDEX, LOCAL, False, endpoint_ip="10.244.2.5")
    assert sorted(c.flow.id for c in to_one) == [2, 3]
    dns = select_connections(KERNEL_FLOWS, INDEX, LOCAL, False, service=DNS.service)
    assert [c.flow.id for c in dns] == [5]


def test_userspace_shows_the_relays_legs_by_endpoint_and_client_legs_without_one() -> None:
    flows = [
        flow("10.244.3.3", "10.96.0.10", 80, NODE, 36001, id_=1),  # redirected to the relay
        flow(NODE, "10.244.1.5", 8080, "10.244.1.5", 8080, id_=2),  # the relay's own
        flow("10.244.3.3", "10.244.2.5", 8080, "10.244.2.5", 8080, id_=3),  # a pod's: not
    ]
    conns = select_connections(flows, INDEX, LOCAL, userspace=True)
    assert [(c.flow.id, c.leg, c.endpoint) for c in conns] == [
        (1, "to-relay", ""),
        (2, "from-relay", "10.244.1.5:8080"),
    ]
    text = render_connections(conns, "userspace")
    assert "the relay's client side" in text and "10.244.1.5:8080" in text


def test_an_untranslated_flow_to_a_vip_names_no_endpoint_and_ipv6_is_bracketed() -> None:
    six = ServicePortName(NamespacedName("default", "six"), "", Protocol.TCP)
    index = build_index({six: ServicePort(six, ("fd00:96::a",), 80)}, {})
    flows = [
        flow("fd00::7", "fd00:96::a", 80, "fd00:244::5", 8080, id_=1),
        flow("fd00::7", "fd00:96::a", 80, "fd00:96::a", 80, id_=2),
    ]
    doc = connections_json(select_connections(flows, index, LOCAL, False), "nftables")
    assert [(g["endpoint"], len(g["flows"])) for g in doc["groups"]] == [
        ("", 1),
        ("[fd00:244::5]:8080", 1),
    ]
    assert doc["groups"][1]["flows"][0]["client"] == "[fd00::7]:40001"


def test_a_service_that_is_not_there_is_said_before_reading_the_kernel() -> None:
    with pytest.raises(ConnectionsInputError, match="default/wbe has no port"):
        live_connections(ClusterState(), LOCAL, "iptables", (4,), "default/wbe")


def test_no_flows_say_so() -> None:
    assert render_connections([], "iptables") == "no live connections of kproxy's services\n"


def test_bad_service_names_and_endpoints_are_refused_clearly() -> None:
    assert parse_service("default/web") == NamespacedName("default", "web")
    for bad in ("web", "/web", "a/b/c"):
        with pytest.raises(ConnectionsInputError, match="NAMESPACE/NAME"):
            parse_service(bad)
    assert parse_endpoint_ip("fd00:0::1") == "fd00::1"
    with pytest.raises(ConnectionsInputError, match="not an IP address"):
        parse_endpoint_ip("pod-1")


def test_a_dumped_tcp_entry_reads_its_tuples_state_timeout_and_age() -> None:
    def tuple_(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
        proto = attr(1, bytes([TCP])) + attr(2, struct.pack(">H", sport))
        proto += attr(3, struct.pack(">H", dport))
        return attr(1 | 0x8000, attr(1, src) + attr(2, dst)) + attr(2 | 0x8000, proto)

    client, vip, endpoint = bytes([10, 0, 0, 7]), bytes([10, 96, 0, 10]), bytes([10, 244, 1, 5])
    entry = attr(1 | 0x8000, tuple_(client, vip, 40000, 80))
    entry += attr(2 | 0x8000, tuple_(endpoint, client, 8080, 40000))
    entry += attr(3, struct.pack(">I", 0xE)) + attr(7, struct.pack(">I", 431990))
    entry += attr(4 | 0x8000, attr(1 | 0x8000, attr(1, b"\x03") + attr(2, b"\x07")))
    entry += attr(12, struct.pack(">I", 99))
    entry += attr(20 | 0x8000, attr(1, struct.pack(">Q", 5_000_000_000)))
    got = decode_full_flow(entry, 0, len(entry), 4, TCP, 12_000_000_000)
    want = ("10.0.0.7", 40000, "10.96.0.10", 80, "10.244.1.5", 8080, "ESTABLISHED", 431990)
    assert got == Flow(TCP, *want, 7.0, 99)
    unstamped = decode_full_flow(entry[:-16], 0, len(entry) - 16, 4, TCP, 0)
    assert unstamped is not None and unstamped.age is None
    no_id = entry.replace(attr(12, struct.pack(">I", 99)), b"")
    assert decode_full_flow(no_id, 0, len(no_id), 4, TCP, 0) is None


def test_the_dump_filter_names_only_the_protocol() -> None:
    attrs = dict(protocol_filter_attrs(UDP))
    assert attrs["CTA_FILTER"] == {"attrs": [("CTA_FILTER_ORIG_FLAGS", 1 << 3)]}


@pytest.mark.parametrize("family", [4, 6])
def test_the_original_addresses_are_read_where_the_kernel_puts_them_or_found(family: int) -> None:
    entry = kernel_entry(family, b"")
    client, vip, _ = FLOWS[family]
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    want = (socket.inet_pton(af, client), socket.inet_pton(af, vip))
    assert _orig_addresses(entry, 0, len(entry), family) == want
    first = struct.unpack_from("<H", entry)[0]  # the original tuple, moved after the reply's
    moved = entry[first:] + entry[:first]
    assert _orig_addresses(moved, 0, len(moved), family) == want
