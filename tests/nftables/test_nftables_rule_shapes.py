"""A rule encoded from its shape's template is byte for byte what the general encoder (each
statement encoded on its own) makes of it: for every rule the planner makes in every scenario,
and for the endpoint and balancing rules with any address, port and name."""

from __future__ import annotations

import ipaddress

import pytest
import scenarios
from hypothesis import given
from hypothesis import strategies as st

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables import rules as r
from kproxy.plan.nftables.ir import Dnat, Key, Match, NumgenZero, Rule, Update, Verdict

NAMES = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_/.", min_size=1, max_size=60)
V4 = st.ip_addresses(v=4).map(str)
V6 = st.ip_addresses(v=6).map(str)
PORTS = st.integers(0, 65535)
MARK_MASQ = Verdict("jump", "mark-for-masquerade")


def _assert_as_general(rule: Rule, family: int) -> None:
    general = r.general_rule(rule, family)
    assert r.encode_rule(rule, family) == general
    assert r.encode_rule_body(rule, family) == r.rule_body(*general)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("name", sorted(scenarios.SCENARIOS))
def test_every_planned_rule_encodes_as_the_general_encoder_does(name: str, family: int) -> None:
    table = scenarios.SCENARIOS[name]().nft_table(family)
    for chain in table.chains:
        for rule in chain.rules:
            _assert_as_general(rule, family)
            assert e.rule_attrs(table.name, chain.name, rule, family) == (
                e.rule_chain_attrs(table.name, chain.name)
                + r.rule_body(*r.general_rule(rule, family))
            )


def test_the_endpoint_and_balancing_shapes_have_templates() -> None:
    """The rules there are one of per endpoint go through a template, not the general path."""
    table = scenarios.SCENARIOS["affinity"]().nft_table(4)
    shaped = 0
    for chain in table.chains:
        if chain.name.startswith(("endpoint-", "service-")):
            for rule in chain.rules:
                split = r.split_rule(rule, 4)
                assert split is not None
                assert r.build_template(split[0]) is not None, rule
                shaped += 1
    assert shaped >= 4


@given(V4, V4, PORTS, NAMES)
def test_an_endpoint_chains_rules_with_any_values(
    ip: str, other: str, port: int, name: str
) -> None:
    _assert_as_general(Rule((Match(Key.SADDR, ip), MARK_MASQ)), 4)
    _assert_as_general(Rule((Match(Key.L4PROTO, "udp"), Dnat(ip, port))), 4)
    _assert_as_general(Rule((Update("affinity-" + name, Key.SADDR),)), 4)
    _assert_as_general(Rule((Match(Key.DADDR, other, negate=True), Verdict("goto", name))), 4)


@given(V6, PORTS, NAMES, st.integers(2, 300))
def test_ipv6_endpoint_and_balancing_rules_with_any_values(
    ip: str, port: int, name: str, modulus: int
) -> None:
    _assert_as_general(Rule((Match(Key.SADDR, ip), MARK_MASQ), "a comment"), 6)
    _assert_as_general(Rule((Match(Key.L4PROTO, "sctp"), Dnat(ip, port))), 6)
    _assert_as_general(Rule((NumgenZero(modulus), Verdict("goto", "endpoint-" + name))), 6)


@given(V4, st.integers(1, 32), st.booleans())
def test_an_address_range_match_is_encoded_whole(ip: str, prefix: int, negate: bool) -> None:
    """A CIDR match has no template value (its length and mask vary): it is its own shape."""
    cidr = str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
    rule = Rule((Match(Key.SADDR, cidr, negate), Verdict("return")))
    _assert_as_general(rule, 4)
    if ipaddress.ip_network(cidr).prefixlen < 32:
        split = r.split_rule(rule, 4)
        assert split is not None and split[1] == []


def test_rules_of_one_shape_differ_only_in_their_values() -> None:
    one = r.encode_rule_body(Rule((Match(Key.L4PROTO, "tcp"), Dnat("10.0.0.1", 80))), 4)
    two = r.encode_rule_body(Rule((Match(Key.L4PROTO, "tcp"), Dnat("10.0.0.2", 8080))), 4)
    assert len(one) == len(two)
    differing = [i for i in range(len(one)) if one[i] != two[i]]
    assert len(differing) == 3  # the address's last byte and both bytes of the port
