"""The IR as nf_tables messages: a table, its chains, rules, sets and elements as the attribute
blocks of NEW/DEL messages and of requests for them, built from pyroute2's encodings
(templates.py) in the kernel's own canonical form: attributes in the order, and with the
defaults, that the kernel dumps them back. So what kproxy sends for a rule is byte for byte what
a later dump of that rule returns, and a foreign change shows as a difference of bytes.
tests/nftables/test_nftables_encode.py checks whole messages against pyroute2 encoding them in
one go."""

from __future__ import annotations

import socket
import struct
from dataclasses import replace
from functools import lru_cache
from typing import Any

from pyroute2.netlink.nfnetlink.nftsocket import (
    nft_chain_msg,
    nft_rule_msg,
    nft_set_elem_list_msg,
    nft_set_msg,
    nft_table_msg,
)

from kproxy.dataplane.nftables import rules
from kproxy.dataplane.nftables.expressions import PROTOCOLS, verdict_attrs
from kproxy.dataplane.nftables.netlink import iter_attrs
from kproxy.dataplane.nftables.templates import (
    ELEMENTS,
    Attrs,
    EncodingError,
    Spliced,
    attr,
    name_bytes,
    payload_of,
    probe_text,
    pyroute2_attrs,
    spliced,
    string_attr,
)
from kproxy.plan.nftables.ir import Chain, Element, NamedSet, Rule, Verdict

COMMENT_LIMIT = rules.COMMENT_LIMIT
encode_rule = rules.encode_rule  # (expressions, user data): what a dump of the rule returns
encode_rule_body = rules.encode_rule_body

HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
DATATYPES = {
    "ipv4_addr": (7, 4),
    "ipv6_addr": (8, 16),
    "inet_proto": (12, 1),
    "inet_service": (13, 2),
}
NFT_DATA_VERDICT = 0xFFFFFF00
_SET_FLAGS = {
    "dynamic": "NFT_SET_EVAL",
    "timeout": "NFT_SET_TIMEOUT",
    "interval": "NFT_SET_INTERVAL",
}
# What nft 1.0.6 writes as a set's user data before its comment: the key byte order of a plain
# address set, and for a verdict map the byte orders and typeof hints it always adds.
_SET_UDATA_ADDRESS: list[tuple[str, bytes | str]] = [
    ("NFTNL_UDATA_SET_KEYBYTEORDER", bytes.fromhex("02000000"))
]
_SET_UDATA_MAP: list[tuple[str, bytes | str]] = [
    ("NFTNL_UDATA_SET_KEYBYTEORDER", bytes(4)),
    ("NFTNL_UDATA_SET_DATABYTEORDER", bytes(4)),
    ("NFTNL_UDATA_SET_KEY_TYPEOF", bytes.fromhex("00040d0000000100")),
    ("NFTNL_UDATA_SET_DATA_INTERVAL", bytes(4)),
]


@lru_cache(maxsize=16)
def _rule_table_attr(table: str) -> bytes:
    return string_attr(nft_rule_msg, "NFTA_RULE_TABLE", table)


def rule_chain_attrs(table: str, chain: str) -> bytes:
    """A rule message's table and chain (all a chain's rules, when nothing else follows). Made
    once per chain by its callers, so not cached: a cache of a large table's chains would hold
    about 30 MB."""
    return _rule_table_attr(table) + string_attr(nft_rule_msg, "NFTA_RULE_CHAIN", chain)


def rule_attrs(table: str, chain: str, rule: Rule, family: int) -> bytes:
    return rule_chain_attrs(table, chain) + rules.encode_rule_body(rule, family)


@lru_cache(maxsize=256)
def _defined_chain(table: str, name: str, hook: Any, comment: str | None) -> bytes:
    attrs: Attrs = [("NFTA_CHAIN_TABLE", table), ("NFTA_CHAIN_NAME", name)]
    if hook is not None:
        attrs += [
            ("NFTA_CHAIN_TYPE", hook.type),
            ("NFTA_CHAIN_POLICY", 1),  # accept
            (
                "NFTA_CHAIN_HOOK",
                {
                    "attrs": [
                        ("NFTA_HOOK_HOOKNUM", HOOKS[hook.hook]),
                        ("NFTA_HOOK_PRIORITY", hook.priority),
                    ]
                },
            ),
        ]
    if comment:
        attrs.append(("NFTA_CHAIN_USERDATA", comment[:COMMENT_LIMIT]))
    return pyroute2_attrs(nft_chain_msg, attrs)


@lru_cache(maxsize=16)
def _chain_table_attr(table: str) -> bytes:
    return string_attr(nft_chain_msg, "NFTA_CHAIN_TABLE", table)


def chain_name_attrs(table: str, name: str) -> bytes:
    return _chain_table_attr(table) + string_attr(nft_chain_msg, "NFTA_CHAIN_NAME", name)


def chain_attrs(table: str, chain: Chain) -> bytes:
    if chain.hook is None and not chain.comment:
        return chain_name_attrs(table, chain.name)
    return _defined_chain(table, chain.name, chain.hook, chain.comment)


@lru_cache(maxsize=16)
def table_attrs(name: str, comment: str | None = None) -> bytes:
    attrs: Attrs = [("NFTA_TABLE_NAME", name), ("NFTA_TABLE_FLAGS", 0)]
    if comment:
        attrs.append(("NFTA_TABLE_USERDATA", comment[:COMMENT_LIMIT]))
    return pyroute2_attrs(nft_table_msg, attrs)


@lru_cache(maxsize=16)
def table_name_attrs(name: str) -> bytes:
    """The table's name: what a request or a dump filtered to the table carries (every
    nf_tables message numbers the table's name 1)."""
    return string_attr(nft_table_msg, "NFTA_TABLE_NAME", name)


def _key_type(types: tuple[str, ...]) -> tuple[int, int]:
    kind = 0
    length = 0
    for name in types:
        datatype, size = DATATYPES[name]
        kind = (kind << 6) | datatype
        length += (size + 3) & ~3 if len(types) > 1 else size
    return kind, length


def _set_flag_bit(name: str) -> int:
    return 1 << list(nft_set_msg.set_flags.ops).index(name)


SET_MAP_BIT = _set_flag_bit("NFT_SET_MAP")
SET_FLAG_BITS = {flag: _set_flag_bit(name) for flag, name in _SET_FLAGS.items()}  # for decoding
SET_COMMENT_UDATA = nft_set_msg.set_udata.udata_types.index("NFTNL_UDATA_SET_COMMENT")


def set_udata_prefix(verdict_map: bool) -> bytes:
    """A set's user data before its comment."""
    return bytes(
        nft_set_msg.set_udata.udata_encode(_SET_UDATA_MAP if verdict_map else _SET_UDATA_ADDRESS)
    )


def _set_message(table: str, s: NamedSet, set_id: int) -> bytes:
    flags = {"NFT_SET_MAP"} if s.verdict_map else set()
    flags.update(_SET_FLAGS[flag] for flag in s.flags)
    key_type, key_len = _key_type(s.key_types)
    attrs: Attrs = [
        ("NFTA_SET_TABLE", table),
        ("NFTA_SET_NAME", s.name),
        ("NFTA_SET_FLAGS", flags),
        ("NFTA_SET_KEY_TYPE", key_type),
        ("NFTA_SET_KEY_LEN", key_len),
    ]
    if s.verdict_map:
        attrs += [("NFTA_SET_DATA_TYPE", NFT_DATA_VERDICT), ("NFTA_SET_DATA_LEN", 0)]
    attrs.append(("NFTA_SET_ID", set_id))
    if s.size is not None:
        attrs.append(("NFTA_SET_DESC", {"attrs": [("NFTA_SET_DESC_SIZE", s.size)]}))
    if s.timeout is not None:
        attrs.append(("NFTA_SET_TIMEOUT", s.timeout * 1000))
    udata = list(_SET_UDATA_MAP if s.verdict_map else _SET_UDATA_ADDRESS)
    if s.comment:
        udata.append(("NFTNL_UDATA_SET_COMMENT", s.comment[:COMMENT_LIMIT]))
    attrs.append(("NFTA_SET_USERDATA", udata))
    return pyroute2_attrs(nft_set_msg, attrs)


@lru_cache(maxsize=1024)
def _set_template(table: str, shape: NamedSet, name_size: int) -> Spliced:
    """A set's definition with its name and its transaction id cut out: affinity sets differ
    only in those."""
    return spliced(
        lambda name, set_id: _set_message(
            table, replace(shape, name=probe_text(name)), struct.unpack(">I", set_id)[0]
        ),
        name_size,
        4,
    )


def set_attrs(table: str, s: NamedSet, set_id: int) -> bytes:
    name = name_bytes(s.name)
    shape = replace(s, name="")
    return _set_template(table, shape, len(name)).fill(name, struct.pack(">I", set_id))


def set_name_attrs(table: str, name: str) -> bytes:
    return string_attr(nft_set_msg, "NFTA_SET_TABLE", table) + string_attr(
        nft_set_msg, "NFTA_SET_NAME", name
    )


def _key_part(value: str, concat: bool) -> bytes:
    if value in PROTOCOLS:
        raw = bytes([PROTOCOLS[value]])
    elif value.isdigit():
        raw = struct.pack(">H", int(value))
    else:
        raw = socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
    return raw + b"\0" * (-len(raw) % 4) if concat else raw


RAW_KEY_PREFIX = "raw:"  # a key given as its bytes, in hex


@lru_cache(maxsize=1 << 18)
def element_key(key: tuple[str, ...]) -> bytes:
    if len(key) == 1 and key[0].startswith(RAW_KEY_PREFIX):
        return bytes.fromhex(key[0][len(RAW_KEY_PREFIX) :])
    concat = len(key) > 1
    return b"".join(_key_part(part, concat) for part in key)


def _element(key: bytes, verdict: tuple[str, str | None] | None) -> bytes:
    """One element of an element list, as pyroute2 encodes it."""
    elem: Attrs = [("NFTA_SET_ELEM_KEY", {"attrs": [("NFTA_DATA_VALUE", key)]})]
    if verdict is not None:
        elem.append(("NFTA_SET_ELEM_DATA", verdict_attrs(*verdict)))
    encoded = pyroute2_attrs(
        nft_set_elem_list_msg, [("NFTA_SET_ELEM_LIST_ELEMENTS", [{"attrs": elem}])]
    )
    return payload_of(encoded)


@lru_cache(maxsize=1024)
def _element_template(key_size: int, kind: str | None, chain_size: int) -> Spliced:
    if kind is None:
        return spliced(lambda key: _element(key, None), key_size)
    if not chain_size:
        return spliced(lambda key: _element(key, (kind, None)), key_size)
    return spliced(
        lambda key, chain: _element(key, (kind, probe_text(chain))), key_size, chain_size
    )


def encode_element(element: Element, with_data: bool = True) -> bytes:
    key = element_key(element.key)
    verdict = element.verdict if with_data else None
    if verdict is None:
        return _element_template(len(key), None, 0).around(key)
    if verdict.chain is None:
        return _element_template(len(key), verdict.kind, 0).around(key)
    chain = name_bytes(verdict.chain)
    return _element_template(len(key), verdict.kind, len(chain)).fill(key, chain)


_ELEMENT_DATA = 2  # NFTA_SET_ELEM_DATA, inside an element


@lru_cache(maxsize=1 << 16)
def verdict_data(v: Verdict) -> bytes:
    """An element's NFTA_SET_ELEM_DATA payload, as the kernel dumps it."""
    element = payload_of(encode_element(Element(("raw:00",), v)))
    for kind, value in iter_attrs(element):
        if kind == _ELEMENT_DATA:
            return value
    raise EncodingError(f"no data in the element of {v}")


MAX_ELEMENTS_ATTR = 60000  # an attribute's length is 16 bits


def element_list_attrs(table: str, set_name: str) -> bytes:
    """An element list's table and set: the head of its messages and of a dump of it."""
    return string_attr(nft_set_elem_list_msg, "NFTA_SET_ELEM_LIST_TABLE", table) + string_attr(
        nft_set_elem_list_msg, "NFTA_SET_ELEM_LIST_SET", set_name
    )


def element_batches(
    table: str, set_name: str, elements: list[Element], with_data: bool = True
) -> list[bytes]:
    """NEWSETELEM/DELSETELEM attribute blocks, split to fit the 16-bit attribute length."""
    head = element_list_attrs(table, set_name)
    kind = ELEMENTS["NFTA_SET_ELEM_LIST_ELEMENTS"]
    out: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for element in elements:
        encoded = encode_element(element, with_data)
        if chunk and size + len(encoded) > MAX_ELEMENTS_ATTR:
            out.append(head + attr(kind, b"".join(chunk)))
            chunk, size = [], 0
        chunk.append(encoded)
        size += len(encoded)
    if chunk:
        out.append(head + attr(kind, b"".join(chunk)))
    return out
