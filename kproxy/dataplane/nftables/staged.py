"""A table the kernel does not hold yet is written in stages, so that the kernel's commit and
kproxy's encoding overlap instead of adding up.

Packets enter a table only through its base chains. So first, in as many transactions as it
takes, everything else goes in: the table, its sets and elements, its regular chains and their
rules, none of which a packet can reach yet (and the kernel's commit-time check of the jump graph,
which starts from the base chains, has nothing to walk). Then the base chains and their rules go
in the sync's one final transaction, with whatever else the sync writes. Packets see no table,
then the whole table. While the kernel commits one stage (inside the send, with Python's lock
released), kproxy encodes the next.

Every commit costs the kernel a walk of all the table's chains besides its messages (it looks
for base chains to validate from, and for chains with new rules to publish): about 0.25 us a
chain, 60 ms a commit at 255,000 chains. So the stages are few and large, and the chains come
a stage's worth at a time, just before their rules, not all chains first: a stage's walk covers
only the chains written so far. Each stage's chains are created together, not one among its
rules: the kernel's chain list is walked faster (on every commit, and on every chain dump, e.g.
by iptables-nft-save, whose dump restarts at the first chain for every datagram) when the
chains lie side by side in memory: measured at 5,000 x 50, an `iptables-nft-save -t nat` took
13.5 s of kernel time over chains created one by one among their rules, 4.3-4.9 s over chains
created in blocks.

A stage the kernel refuses fails the sync: the unfinished tables, which nothing reached, are
deleted again."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables.delta import (
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    Msg,
    TableDelta,
    delta_messages,
)
from kproxy.dataplane.nftables.families import NFPROTO
from kproxy.dataplane.nftables.netlink import NLM_F_APPEND, NLM_F_CREATE, NftNetlink
from kproxy.plan.nftables.ir import Chain, Verdict

STAGE_MESSAGES = 100_000  # messages per stage: about 30 MB at kproxy's message sizes


class StageRefused(OSError):
    """The kernel refused a stage, after `committed` earlier stages went in."""

    def __init__(self, committed: int, cause: OSError) -> None:
        super().__init__(cause.errno, f"stage {committed + 1}: {cause.strerror or cause}")
        self.committed = committed


def split_fresh(delta: TableDelta) -> tuple[TableDelta, TableDelta]:
    """A table written afresh, as (what no packet reaches, its base chains)."""
    unhooked = TableDelta(
        delta.family,
        delta.table,
        create=True,
        comment=delta.comment,
        add_sets=delta.add_sets,
        add_chains=[c for c in delta.add_chains if c.hook is None],
        add_elements=delta.add_elements,
    )
    hooked = TableDelta(
        delta.family, delta.table, add_chains=[c for c in delta.add_chains if c.hook is not None]
    )
    return unhooked, hooked


def write_unhooked(nl: NftNetlink, deltas: list[TableDelta], set_ids: Iterator[int]) -> int:
    """Commit the unhooked parts in stages, each encoded while the previous one commits; how
    many transactions that took."""
    messages = (m for d in deltas for m in unhooked_messages(d, set_ids))
    commits = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nft-stage") as committer:
        pending: Future[None] | None = None
        try:
            while True:
                batch = nl.batch(itertools.islice(messages, STAGE_MESSAGES))
                if pending is not None:
                    try:
                        pending.result()
                    except OSError as exc:
                        raise StageRefused(commits, exc) from exc
                    commits += 1
                    pending = None
                if batch is None:
                    return commits
                pending = committer.submit(nl.commit, batch)
        finally:
            if pending is not None:
                pending.exception()  # let the commit in flight end before the socket is reused


def unhooked_messages(delta: TableDelta, set_ids: Iterator[int]) -> Iterator[Msg]:
    """An unhooked part's messages: the table and its sets; then, a stage's worth at a time,
    the chains whose rules come next, created together, and their rules; then the elements
    (whose verdicts name chains that exist by then). A rule that jumps to a chain not created
    yet (one whose own rules come later) creates it first."""
    head = TableDelta(
        delta.family, delta.table, create=True, comment=delta.comment, add_sets=delta.add_sets
    )
    yield from delta_messages(head, set_ids)
    pending = {c.name: c for c in delta.add_chains}  # chains not created yet
    group: list[Chain] = []
    size = 0
    for chain in delta.add_chains:
        group.append(chain)
        size += 1 + len(chain.rules)
        if size >= STAGE_MESSAGES:
            yield from _chain_group(delta, group, pending)
            group, size = [], 0
    yield from _chain_group(delta, group, pending)
    tail = TableDelta(delta.family, delta.table, add_elements=delta.add_elements)
    yield from delta_messages(tail, set_ids)


def _chain_group(delta: TableDelta, group: list[Chain], pending: dict[str, Chain]) -> Iterator[Msg]:
    """The chains of `group` not created yet, one after the other (the kernel walks its list
    of chains on every commit and every dump: chains allocated together walk faster than
    chains scattered among their rules), then their rules."""
    fam, table, family = NFPROTO[delta.family], delta.table, delta.family
    for chain in group:
        if pending.pop(chain.name, None) is not None:
            yield (NFT_MSG_NEWCHAIN, NLM_F_CREATE, fam, e.chain_attrs(table, chain))
    flags = NLM_F_CREATE | NLM_F_APPEND
    for chain in group:
        head_attrs = e.rule_chain_attrs(table, chain.name)
        for rule in chain.rules:
            last = rule.statements[-1] if rule.statements else None  # a verdict ends a rule
            if type(last) is Verdict and last.chain in pending:
                target = pending.pop(last.chain)
                yield (NFT_MSG_NEWCHAIN, NLM_F_CREATE, fam, e.chain_attrs(table, target))
            yield (NFT_MSG_NEWRULE, flags, fam, head_attrs + e.encode_rule_body(rule, family))
