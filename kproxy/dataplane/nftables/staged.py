"""A table the kernel does not hold yet is written in stages, so that the kernel's commit and
kproxy's encoding overlap instead of adding up.

Packets enter a table only through its base chains. So first, in as many transactions as it
takes, everything else goes in: the table, its sets and elements, its regular chains and their
rules, none of which a packet can reach yet (and the kernel's commit-time check of the jump graph,
which starts from the base chains, has nothing to walk). Then the base chains and their rules go
in the sync's one final transaction, with whatever else the sync writes. Packets see no table,
then the whole table. While the kernel commits one stage (inside the send, with Python's lock
released), kproxy encodes the next.

A stage the kernel refuses fails the sync: the unfinished tables, which nothing reached, are
deleted again."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from kproxy.dataplane.nftables.delta import TableDelta, delta_messages
from kproxy.dataplane.nftables.netlink import NftNetlink

STAGE_MESSAGES = 20000  # messages per stage: about 5 MB at kproxy's message sizes


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
    messages = (m for d in deltas for m in delta_messages(d, set_ids))
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
