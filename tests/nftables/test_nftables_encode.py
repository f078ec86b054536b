"""The nftables encoder's templates against pyroute2 itself: a template filled with a value must
be exactly what pyroute2 encodes for that value, and a piece whose value is not one plain run of
bytes must be refused rather than spliced."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
import scenarios
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink.nftsocket import nft_chain_msg, nft_rule_msg, nft_set_elem_list_msg

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables import expressions as x
from kproxy.dataplane.nftables import templates as t
from kproxy.dataplane.nftables.delta import delta_messages, full_delta
from kproxy.plan.nftables.ir import Element, NamedSet, Verdict

NAMES = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_/.", min_size=1, max_size=60)


def _direct_verdict(kind: str, chain: str) -> bytes:
    return x.expression(
        "immediate",
        [
            ("NFTA_IMMEDIATE_DREG", x.REG_VERDICT),
            (
                "NFTA_IMMEDIATE_DATA",
                {
                    "attrs": [
                        (
                            "NFTA_DATA_VERDICT",
                            {
                                "attrs": [
                                    ("NFTA_VERDICT_CODE", -3 if kind == "jump" else -4),
                                    ("NFTA_VERDICT_CHAIN", chain),
                                ]
                            },
                        )
                    ]
                },
            ),
        ],
    )


def _direct_cmp(value: bytes) -> bytes:
    return x.expression(
        "cmp",
        [
            ("NFTA_CMP_SREG", 1),
            ("NFTA_CMP_OP", 0),
            ("NFTA_CMP_DATA", {"attrs": [("NFTA_DATA_VALUE", value)]}),
        ],
    )


@given(st.sampled_from(["jump", "goto"]), NAMES)
def test_a_verdict_template_filled_is_what_pyroute2_encodes(kind: str, chain: str) -> None:
    assert x.encode_verdict(Verdict(kind, chain)) == _direct_verdict(kind, chain)


@given(st.binary(min_size=1, max_size=16))
def test_a_compare_template_filled_is_what_pyroute2_encodes(value: bytes) -> None:
    assert x.cmp(0, value) == _direct_cmp(value)


@given(NAMES, NAMES)
def test_a_rules_table_and_chain_are_what_pyroute2_encodes(table: str, chain: str) -> None:
    direct = t.pyroute2_attrs(
        nft_rule_msg, [("NFTA_RULE_TABLE", table), ("NFTA_RULE_CHAIN", chain)]
    )
    assert e.rule_chain_attrs(table, chain) == direct


@given(NAMES, st.integers(1, (1 << 31) - 1), st.booleans())
def test_a_set_template_filled_is_what_pyroute2_encodes(
    name: str, set_id: int, verdict_map: bool
) -> None:
    shape = NamedSet(name, ("ipv4_addr",), verdict_map, ("timeout",), timeout=10800)
    assert e.set_attrs("kube-proxy", shape, set_id) == e._set_message("kube-proxy", shape, set_id)


@given(st.ip_addresses(v=4), st.integers(1, 65535), NAMES)
def test_an_element_template_filled_is_what_pyroute2_encodes(
    ip: object, port: int, chain: str
) -> None:
    element = Element((str(ip), "tcp", str(port)), Verdict("goto", chain))
    key = e.element_key(element.key)
    assert e.encode_element(element) == e._element(key, ("goto", chain))
    assert e.encode_element(element, with_data=False) == e._element(key, None)


def _parsed(cls: Any, attrs: bytes) -> Any:
    """pyroute2's reading of a message kproxy framed."""
    msg = cls(struct.pack("<IHHII", 20 + len(attrs), 0, 0, 0, 0) + bytes(4) + attrs)
    msg.decode()
    return msg


def test_pyroute2_reads_back_every_message_kproxy_frames() -> None:
    """Rules (table, chain, each expression, comment), chains (hooks too) and element lists as
    kproxy joins them are what pyroute2 reads them as."""
    rules = 0
    for make in scenarios.SCENARIOS.values():
        table = make().nft_table(4)
        for chain in table.chains:
            head = _parsed(nft_chain_msg, e.chain_attrs(table.name, chain))
            assert head.get_attr("NFTA_CHAIN_NAME") == chain.name
            if chain.hook is not None:
                hook = head.get_attr("NFTA_CHAIN_HOOK")
                assert hook.get_attr("NFTA_HOOK_PRIORITY") == chain.hook.priority
            for rule in chain.rules:
                msg = _parsed(nft_rule_msg, e.rule_attrs(table.name, chain.name, rule, 4))
                assert msg.get_attr("NFTA_RULE_TABLE") == table.name
                assert msg.get_attr("NFTA_RULE_CHAIN") == chain.name
                names = [
                    x.get_attr("NFTA_EXPR_NAME") for x in msg.get_attr("NFTA_RULE_EXPRESSIONS")
                ]
                assert names and all(names)
                if rule.comment:
                    assert rule.comment in str(msg.get_attr("NFTA_RULE_USERDATA"))
                rules += 1
        for set_name, elements in table.elements.items():
            for attrs in e.element_batches(table.name, set_name, sorted(elements)):
                msg = _parsed(nft_set_elem_list_msg, attrs)
                assert msg.get_attr("NFTA_SET_ELEM_LIST_SET") == set_name
                assert len(msg.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS")) == len(elements)
    assert rules > 50


BAD_BUILDS: dict[str, Callable[[bytes], bytes]] = {
    "the value twice": lambda v: v + b"-" + v,
    "a length that follows the value": lambda v: bytes([v[0]]) + v,
    "the value transformed": lambda v: bytes(b ^ 0xFF for b in v) + v[1:],
}


@pytest.mark.parametrize("why", sorted(BAD_BUILDS))
def test_a_value_that_is_not_one_plain_run_is_refused(why: str) -> None:
    with pytest.raises(t.EncodingError):
        t.spliced(BAD_BUILDS[why], 4)


def test_every_message_of_a_table_encodes_and_each_template_is_sound() -> None:
    """Encoding a whole table goes through every template kind kproxy uses."""
    for make in scenarios.SCENARIOS.values():
        for family in (4, 6):
            messages = list(
                delta_messages(full_delta(make().nft_table(family)), iter(range(1, 99)))
            )
            assert messages
