"""The nftables fake refuses what nf_tables refuses, with the kernel's errno (the cases in
nft_cases.py, each checked once against a real kernel), applies a batch whole or not at all, and
answers dumps as the kernel does."""

from __future__ import annotations

import errno
import json

import nft_cases as c
import pytest

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables.fake import FakeNfTables
from kproxy.dataplane.nftables.kernel import read_generation, table_exists
from kproxy.dataplane.nftables.netlink import NetlinkError
from kproxy.plan.nftables.ir import Verdict


@pytest.mark.parametrize("case", c.CASES, ids=[case.name for case in c.CASES])
def test_the_fake_answers_each_case_as_the_kernel(case: c.Case) -> None:
    nft = FakeNfTables()
    assert c.run(case, nft.socket()) == case.code


# What the kernel (6.18) answered to c.DUMPS (a set's elements come in two messages, the second
# with none).
KERNEL_DUMPS = {
    "the rules of a missing chain": "0",
    "the rules of a chain": "2",
    "the rules of a chain of a missing table": "0",
    "the elements of a missing set": "ENOENT",
    "the elements of a set": "2",
    "the chains of a table (unfiltered)": "3",
    "the chains of a missing table (unfiltered)": "3",
    "the sets of a table": "2",
}


def test_the_fake_answers_dumps_as_the_kernel() -> None:
    assert dict(c.probe_dumps(FakeNfTables().socket())) == KERNEL_DUMPS


def test_the_fake_dumps_the_bytes_the_kernel_dumps() -> None:
    """Attribute for attribute, in the kernel's order, with its handles, use counts and
    positions (recorded from a 6.18 kernel by `nft_cases.py --record` in a network namespace)."""
    kernel = json.loads(c.GOLDEN.read_text())
    assert c.snapshot(FakeNfTables().socket()) == kernel


def test_a_refused_batch_changes_nothing_and_bumps_no_generation() -> None:
    nft = FakeNfTables()
    nl = nft.socket()
    nl.transact(c.SETUP)
    before = read_generation(nl)
    with pytest.raises(NetlinkError) as refused:
        nl.transact([c.chain("new"), c.rule("new", Verdict("jump", "missing"))])
    assert refused.value.errno == errno.ENOENT
    assert "message 2" in str(refused.value)  # the second message of the batch
    assert read_generation(nl) == before
    assert "new" not in nft.tables[(c.IP, c.T)].chains


def test_a_commit_notifies_monitors_of_the_tables_it_touched_with_its_port() -> None:
    nft = FakeNfTables()
    mine, other = nft.socket(), nft.socket()
    monitor = nft.monitor()
    mine.transact(c.SETUP)
    assert monitor.changed_tables(mine.port) == set()
    other.transact([c.rule("svc", Verdict("drop"))])
    assert monitor.changed_tables(mine.port) == {(c.IP, c.T)}
    monitor.lost = True
    assert monitor.changed_tables(mine.port) is None


def test_an_injected_refusal_fails_a_later_commit_against_its_first_message() -> None:
    nft = FakeNfTables()
    nl = nft.socket()
    nft.refuse_commit(errno.ENOMEM, after=1)
    nl.transact(c.SETUP)
    with pytest.raises(NetlinkError) as refused:
        nl.transact([c.chain("x")])
    assert refused.value.errno == errno.ENOMEM
    assert table_exists(nl, 4, c.T) and "x" not in nft.tables[(c.IP, c.T)].chains
    nl.transact([c.chain("x")])  # only the one


def test_a_rule_without_append_goes_first() -> None:
    nft = FakeNfTables()
    nl = nft.socket()
    nl.transact([*c.SETUP, c.rule("svc", Verdict("accept"))])
    first = (
        c.NFT_MSG_NEWRULE,
        0x400,
        c.IP,
        e.rule_attrs(c.T, "svc", c.Rule((Verdict("drop"),)), 4),
    )
    nl.transact([first])
    rules = nft.tables[(c.IP, c.T)].chains["svc"].rules
    assert [r[1] for r in rules] == [
        e.encode_rule(c.Rule((Verdict("drop"),)), 4)[0],
        e.encode_rule(c.Rule((Verdict("accept"),)), 4)[0],
    ]
