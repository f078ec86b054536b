"""Dumps keep only the answers about what they asked for, whatever the kernel sends: a chain
dump named kproxy's table answers with the chains of every table of the family."""

from __future__ import annotations

import struct

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables import templates as t
from kproxy.dataplane.nftables.netlink import (
    NLM_F_MULTI,
    NLMSG_DONE,
    Message,
    NftNetlink,
    answers,
    iter_attrs,
    nfgen_message,
)

IP, IP6 = 2, 10
GETCHAIN, GETRULE = 4, 7
HANDLE = t.attr(2, struct.pack(">Q", 7))  # what the kernel puts between a chain's table and name


def _chain(family: int, table: str, name: str, handle_first: bool = False) -> Message:
    attrs = e.chain_name_attrs(table, name)
    if handle_first:
        attrs = HANDLE + attrs
    return Message(GETCHAIN, NLM_F_MULTI, 0, struct.pack("<BBH", family, 0, 0) + attrs)


def _rule(family: int, table: str, chain: str, handle_first: bool = False) -> Message:
    attrs = e.rule_chain_attrs(table, chain)
    if handle_first:
        attrs = HANDLE + attrs
    return Message(GETRULE, NLM_F_MULTI, 0, struct.pack("<BBH", family, 0, 0) + attrs)


def test_a_chain_answer_counts_only_in_the_named_table_and_family() -> None:
    request = e.table_name_attrs("kube-proxy")
    assert answers(_chain(IP, "kube-proxy", "services"), IP, request)
    assert answers(_chain(IP, "kube-proxy", "services", handle_first=True), IP, request)
    assert not answers(_chain(IP, "filter", "KUBE-FIREWALL"), IP, request)
    assert not answers(_chain(IP, "filter", "INPUT", handle_first=True), IP, request)
    assert not answers(_chain(IP6, "kube-proxy", "services"), IP, request)
    assert not answers(_chain(IP, "kube-proxy-x", "services"), IP, request)


def test_a_rule_answer_counts_only_in_the_named_chain() -> None:
    request = e.rule_chain_attrs("kube-proxy", "services")
    assert answers(_rule(IP, "kube-proxy", "services"), IP, request)
    assert answers(_rule(IP, "kube-proxy", "services", handle_first=True), IP, request)
    assert not answers(_rule(IP, "kube-proxy", "nodeports"), IP, request)
    assert not answers(_rule(IP, "filter", "services", handle_first=True), IP, request)


def test_a_request_naming_nothing_takes_every_answer() -> None:
    assert answers(_chain(IP6, "filter", "INPUT"), 0, b"")
    assert not answers(_chain(IP6, "filter", "INPUT"), IP, b"")


class _Kernel:
    """A socket that answers any dump with the chains of every table of every family."""

    def __init__(self, chains: list[Message]) -> None:
        self.chains = chains
        self.pending = b""

    def send(self, data: bytes) -> int:
        seq = struct.unpack_from("<I", data, 8)[0]
        self.pending = (
            b"".join(
                nfgen_message(GETCHAIN, NLM_F_MULTI, seq, m.family, m.attrs) for m in self.chains
            )
            + struct.pack("<IHHII", 20, NLMSG_DONE, NLM_F_MULTI, seq, 0)
            + bytes(4)
        )
        return len(data)

    def recv_into(self, buffer: bytearray) -> int:
        data, self.pending = self.pending, b""
        buffer[: len(data)] = data
        return len(data)


def test_a_dump_returns_only_the_named_tables_chains() -> None:
    nl = NftNetlink.__new__(NftNetlink)  # no real socket: _Kernel answers
    nl._seq = 1
    nl._buffer = bytearray(1 << 16)
    nl._view = memoryview(nl._buffer)
    nl.sock = _Kernel(  # type: ignore[assignment]
        [
            _chain(IP, "filter", "INPUT"),
            _chain(IP, "filter", "KUBE-FIREWALL"),
            _chain(IP, "kube-proxy", "services"),
            _chain(IP6, "kube-proxy", "nodeports"),
            _chain(IP, "nat", "CNI-HOSTPORT-DNAT"),
        ]
    )
    found = nl.dump(GETCHAIN, IP, e.table_name_attrs("kube-proxy"))
    assert [(m.family, dict(iter_attrs(m.attrs))[3]) for m in found] == [(IP, b"services\0")]
