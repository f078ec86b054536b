"""Endpoint.at_port, the sync's fast copy of an endpoint onto a slice's port, must copy every
field: a field added to Endpoint and forgotten there would fail here."""

from __future__ import annotations

from dataclasses import fields, replace

from hypothesis import given
from hypothesis import strategies as st

from kproxy.model.endpoint import Endpoint

HINTS = st.lists(st.text("abc-", min_size=1, max_size=4), max_size=2).map(tuple)


@given(
    st.builds(
        Endpoint,
        ip=st.ip_addresses().map(str),
        port=st.integers(0, 65535),
        ready=st.booleans(),
        serving=st.booleans(),
        terminating=st.booleans(),
        node_name=st.text("abc", max_size=3),
        zone_hints=HINTS,
        node_hints=HINTS,
    ),
    st.integers(1, 65535),
)
def test_at_port_is_replace_of_the_port(endpoint: Endpoint, port: int) -> None:
    assert endpoint.at_port(port) == replace(endpoint, port=port)


def test_at_port_knows_every_field() -> None:
    assert [f.name for f in fields(Endpoint)] == [
        "ip",
        "port",
        "ready",
        "serving",
        "terminating",
        "node_name",
        "zone_hints",
        "node_hints",
    ]
