"""The converter's shortcuts for the common shapes (an IPv4 address in canonical form, a plain
endpoint) answer exactly as its full reading does, or leave the value to it."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.errors import InvalidObjectError
from kproxy.model.addresses import canonical_ipv4, read_ip_fully
from kproxy.model.convert import build_endpoint_slice
from kproxy.model.fields import FieldReader, is_dns1123_label, is_dns1123_subdomain
from kproxy.model.slices import _endpoint, _plain_endpoint


def full(text: str, special_ok: bool, vip: bool) -> str | InvalidObjectError:
    try:
        return read_ip_fully(FieldReader("Service a/b"), text, "spec.clusterIP", special_ok, vip)
    except InvalidObjectError as exc:
        return exc


octet_texts = st.one_of(
    st.integers(0, 300).map(str),
    st.integers(0, 255).map(lambda n: f"{n:03d}"),
    st.sampled_from(["", "-1", "+1", " 1", "1_0", "0x1", "\u0661", "a", "1\x00"]),
)
ipv4_like = st.lists(octet_texts, min_size=3, max_size=5).map(".".join)
special_octets = st.sampled_from([0, 1, 10, 127, 169, 172, 192, 223, 224, 225, 239, 240, 254, 255])
near_special = st.tuples(special_octets, special_octets, special_octets, special_octets).map(
    lambda t: ".".join(map(str, t))
)
texts = st.one_of(
    ipv4_like,
    near_special,
    st.ip_addresses().map(str),
    st.text(alphabet="0123456789.:abcdef%", max_size=20),
    st.text(max_size=8),
)


@settings(max_examples=3000, deadline=None)
@given(texts, st.booleans(), st.booleans())
def test_canonical_ipv4_agrees_with_the_full_reading(
    text: str, special_ok: bool, vip: bool
) -> None:
    fast = canonical_ipv4(text, special_ok=special_ok, vip=vip)
    if fast is not None:
        assert full(text, special_ok, vip) == fast


@pytest.mark.parametrize(
    ("text", "special_ok", "vip"),
    [
        ("10.0.0.1", False, False),
        ("255.255.255.255", False, False),
        ("224.0.1.1", False, False),  # multicast: refused only for a VIP
        ("240.0.0.1", False, True),
        ("127.0.0.1", True, False),
        ("0.0.0.0", True, True),
    ],
)
def test_canonical_ipv4_takes_the_common_addresses(text: str, special_ok: bool, vip: bool) -> None:
    assert (
        canonical_ipv4(text, special_ok=special_ok, vip=vip) == text == full(text, special_ok, vip)
    )


@pytest.mark.parametrize(
    ("text", "vip"),
    [
        ("010.1.2.3", False),  # legacy leading zeros: the full reading's business
        ("0.0.0.0", False),
        ("127.0.0.5", False),
        ("169.254.1.1", False),
        ("224.0.0.7", False),
        ("230.1.1.1", True),
        ("::ffff:10.0.0.1", False),
        ("fd00::1", False),
    ],
)
def test_canonical_ipv4_leaves_the_rest_to_the_full_reading(text: str, vip: bool) -> None:
    assert canonical_ipv4(text, vip=vip) is None


def test_every_special_range_is_left_to_the_full_reading() -> None:
    for net in ("0.0.0.0/32", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/24"):
        network = ipaddress.ip_network(net)
        for ip in (network.network_address, network.broadcast_address):
            assert canonical_ipv4(str(ip)) is None
            assert isinstance(full(str(ip), False, False), InvalidObjectError)


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.text(max_size=4),
    st.lists(st.none(), max_size=1),
    st.dictionaries(st.text(max_size=3), st.none(), max_size=1),
)
addresses = st.one_of(
    st.lists(st.one_of(texts, json_values), max_size=2),
    json_values,
)
conditions = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "ready": st.one_of(st.booleans(), json_values),
            "serving": st.one_of(st.booleans(), json_values),
            "terminating": st.one_of(st.booleans(), json_values),
        },
    ),
    json_values,
)
endpoints = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "addresses": addresses,
            "conditions": conditions,
            "nodeName": st.one_of(st.sampled_from(["node-a", ""]), json_values),
            "hints": st.one_of(st.just({"forZones": [{"name": "z"}]}), st.just({}), json_values),
            "zone": st.text(max_size=3),
        },
    ),
    json_values,
)


def read_fully(item: Any, family: int) -> Any:
    try:
        return _endpoint(FieldReader("EndpointSlice a/b"), item, "endpoints[0]", family)
    except InvalidObjectError as exc:
        return exc


@settings(max_examples=3000, deadline=None)
@given(endpoints, st.sampled_from([4, 6]))
def test_plain_endpoint_agrees_with_the_full_reading(item: Any, family: int) -> None:
    fast = _plain_endpoint(item, family)
    if fast is not None:
        assert read_fully(item, family) == fast


def test_a_plain_endpoint_takes_the_shortcut() -> None:
    item = {"addresses": ["10.0.0.1"], "conditions": {"ready": False}, "nodeName": "n"}
    assert _plain_endpoint(item, 4) == read_fully(item, 4)
    assert _plain_endpoint(item, 4) is not None


def test_a_slice_reads_as_before_with_bad_endpoints_among_good_ones() -> None:
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {"name": "s", "namespace": "n", "labels": {"kubernetes.io/service-name": "a"}},
        "ports": [{"name": "", "port": 80, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.0.0.1"]},
            {"addresses": ["127.0.0.1"]},
            {"addresses": ["010.0.0.2"], "conditions": {"ready": "yes"}},
            {"addresses": ["10.0.0.3"], "hints": {"forZones": [{"name": "z"}]}},
        ],
    }
    info = build_endpoint_slice(slice_)
    assert info is not None
    assert [e.ip for e in info.endpoints] == ["10.0.0.1", "10.0.0.3"]
    assert info.endpoints[1].zone_hints == ("z",)
    assert [str(s) for s in info.skipped] == [
        str(
            InvalidObjectError(
                "EndpointSlice n/s",
                "endpoints[1].addresses[0]",
                "'127.0.0.1' is a loopback address; endpoint skipped",
            )
        ),
        str(
            InvalidObjectError(
                "EndpointSlice n/s",
                "endpoints[2].conditions.ready",
                "must be true or false, not 'yes'; endpoint skipped",
            )
        ),
    ]


def subdomain_by_labels(value: str) -> bool:
    """The rule as its definition states it: DNS-1123 labels joined by dots, 253 at most."""
    return len(value) <= 253 and all(is_dns1123_label(part) for part in value.split("."))


names = st.one_of(
    st.text(alphabet="a-z09.", max_size=80),
    st.lists(st.text(alphabet="ab-0", min_size=0, max_size=70), max_size=5).map(".".join),
    st.text(max_size=10),
    st.integers(60, 66).map(lambda n: "a" * n),
    st.integers(250, 256).map(lambda n: ("a" * 62 + ".") * 4 + "b" * (n - 252)),
)


@settings(max_examples=3000, deadline=None)
@given(names)
def test_the_subdomain_pattern_is_the_label_rule(value: str) -> None:
    assert is_dns1123_subdomain(value) == subdomain_by_labels(value)


def test_a_reader_names_its_object_only_when_it_fails() -> None:
    asked: list[str] = []

    def ref() -> str:
        asked.append("ref")
        return "Service a/b"

    reader = FieldReader(ref)
    assert reader.string("x", "spec.type") == "x"
    assert asked == []
    assert str(reader.fail("spec", "bad")) == str(InvalidObjectError("Service a/b", "spec", "bad"))
    assert reader.ref == "Service a/b" and asked == ["ref"]
