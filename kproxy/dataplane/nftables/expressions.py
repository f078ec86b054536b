"""nf_tables expressions, each as pyroute2 encodes it inside a rule's expression list, cached
(or a Spliced template where a value varies): the bytecode statements.py builds rules from."""

from __future__ import annotations

import struct
from functools import lru_cache

from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg

from kproxy.dataplane.nftables.families import NFPROTO
from kproxy.dataplane.nftables.templates import (
    Attrs,
    Spliced,
    name_bytes,
    payload_of,
    probe_text,
    pyroute2_attrs,
    spliced,
)
from kproxy.plan.nftables.ir import Verdict

REG_VERDICT = 0
REG_1 = 1
REG_2 = 2
REG32_00 = 8

PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
VERDICTS = {"drop": 0, "accept": 1, "jump": -3, "goto": -4, "return": -5}


def expression(name: str, data: Attrs) -> bytes:
    """One expression of a rule's list, as pyroute2 encodes it."""
    encoded = pyroute2_attrs(
        nft_rule_msg,
        [
            (
                "NFTA_RULE_EXPRESSIONS",
                [{"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": data})]}],
            )
        ],
    )
    return payload_of(encoded)


def data_value(value: bytes) -> dict[str, Attrs]:
    return {"attrs": [("NFTA_DATA_VALUE", value)]}


def verdict_attrs(kind: str, chain: str | None) -> dict[str, Attrs]:
    verdict: Attrs = [("NFTA_VERDICT_CODE", VERDICTS[kind])]
    if chain is not None:
        verdict.append(("NFTA_VERDICT_CHAIN", chain))
    return {"attrs": [("NFTA_DATA_VERDICT", {"attrs": verdict})]}


def host32(value: int) -> bytes:
    """A 32-bit register value in host byte order (ct state, fib type, mark)."""
    return struct.pack("=I", value & 0xFFFFFFFF)


@lru_cache(maxsize=256)
def payload(dreg: int, base: int, offset: int, length: int) -> bytes:
    return expression(
        "payload",
        [
            ("NFTA_PAYLOAD_DREG", dreg),
            ("NFTA_PAYLOAD_BASE", base),
            ("NFTA_PAYLOAD_OFFSET", offset),
            ("NFTA_PAYLOAD_LEN", length),
        ],
    )


@lru_cache(maxsize=256)
def meta_load(key: int, dreg: int) -> bytes:
    return expression("meta", [("NFTA_META_KEY", key), ("NFTA_META_DREG", dreg)])


@lru_cache(maxsize=64)
def _cmp_template(op: int, size: int) -> Spliced:
    return spliced(
        lambda v: expression(
            "cmp", [("NFTA_CMP_SREG", REG_1), ("NFTA_CMP_OP", op), ("NFTA_CMP_DATA", data_value(v))]
        ),
        size,
    )


def cmp(op: int, value: bytes) -> bytes:
    return _cmp_template(op, len(value)).around(value)


@lru_cache(maxsize=64)
def _immediate_template(dreg: int, size: int) -> Spliced:
    return spliced(
        lambda v: expression(
            "immediate", [("NFTA_IMMEDIATE_DREG", dreg), ("NFTA_IMMEDIATE_DATA", data_value(v))]
        ),
        size,
    )


def immediate(dreg: int, value: bytes) -> bytes:
    return _immediate_template(dreg, len(value)).around(value)


@lru_cache(maxsize=4)
def nat(family: int) -> bytes:
    """DNAT to the address in reg 1 and the port in reg 2."""
    return expression(
        "nat",
        [
            ("NFTA_NAT_TYPE", 1),  # dnat
            ("NFTA_NAT_FAMILY", NFPROTO[family]),
            ("NFTA_NAT_REG_ADDR_MIN", REG_1),
            ("NFTA_NAT_REG_ADDR_MAX", REG_1),
            ("NFTA_NAT_REG_PROTO_MIN", REG_2),
            ("NFTA_NAT_REG_PROTO_MAX", REG_2),
            ("NFTA_NAT_FLAGS", {"NF_NAT_RANGE_MAP_IPS", "NF_NAT_RANGE_PROTO_SPECIFIED"}),
        ],
    )


@lru_cache(maxsize=256)
def bitwise(mask: bytes, xor: bytes) -> bytes:
    return expression(
        "bitwise",
        [
            ("NFTA_BITWISE_SREG", REG_1),
            ("NFTA_BITWISE_DREG", REG_1),
            ("NFTA_BITWISE_LEN", len(mask)),
            ("NFTA_BITWISE_OP", 0),  # boolean: (reg & mask) ^ xor
            ("NFTA_BITWISE_MASK", data_value(mask)),
            ("NFTA_BITWISE_XOR", data_value(xor)),
        ],
    )


@lru_cache(maxsize=256)
def lookup(set_name: str, verdict: bool) -> bytes:
    data: Attrs = [("NFTA_LOOKUP_SET", set_name), ("NFTA_LOOKUP_SREG", REG_1)]
    if verdict:
        data.append(("NFTA_LOOKUP_DREG", REG_VERDICT))
    data.append(("NFTA_LOOKUP_FLAGS", set()))
    return expression("lookup", data)


@lru_cache(maxsize=256)
def dynset_template(size: int) -> Spliced:
    """Add or refresh the key in reg 1 in a named set (its name is the value)."""
    return spliced(
        lambda v: expression(
            "dynset",
            [
                ("NFTA_DYNSET_SREG_KEY", REG_1),
                ("NFTA_DYNSET_OP", 1),  # update
                ("NFTA_DYNSET_SET_NAME", probe_text(v)),
                ("NFTA_DYNSET_TIMEOUT", 0),
                ("NFTA_DYNSET_FLAGS", set()),
            ],
        ),
        size,
    )


@lru_cache(maxsize=1024)
def _verdict_template(kind: str, size: int) -> Spliced:
    return spliced(
        lambda v: expression(
            "immediate",
            [
                ("NFTA_IMMEDIATE_DREG", REG_VERDICT),
                ("NFTA_IMMEDIATE_DATA", verdict_attrs(kind, probe_text(v))),
            ],
        ),
        size,
    )


@lru_cache(maxsize=16)
def _plain_verdict(kind: str) -> bytes:
    return expression(
        "immediate",
        [("NFTA_IMMEDIATE_DREG", REG_VERDICT), ("NFTA_IMMEDIATE_DATA", verdict_attrs(kind, None))],
    )


def encode_verdict(v: Verdict) -> bytes:
    if v.chain is None:
        return _plain_verdict(v.kind)
    name = name_bytes(v.chain)
    return _verdict_template(v.kind, len(name)).around(name)
