"""Removing the nftables mode's tables when another mode takes over the node, against the
nftables fake: what goes is reported chain by chain (so the other mode's summary counts it), and
another program's table in the same family stays exactly as it was."""

from __future__ import annotations

import copy

from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables.delta import NFT_MSG_NEWCHAIN, NFT_MSG_NEWTABLE
from kproxy.dataplane.nftables.fake import FakeNfTables
from kproxy.dataplane.nftables.netlink import NLM_F_CREATE
from kproxy.dataplane.nftables.node import NftablesNode, remove_nftables_mode
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.plan.nftables.ir import Chain, Hook
from tests.conftest import Leftovers
from tests.sync.test_mode_leftovers import no_sysctls, once

IP = 2  # NFPROTO_IPV4


def nftables_mode_chains(nft: FakeNfTables) -> list[str]:
    """Sync the nftables mode onto the fake, beside another program's table: its chains."""
    base = Chain("input", (), Hook("filter", "input", 0))
    nft.socket().transact(
        [
            (NFT_MSG_NEWTABLE, NLM_F_CREATE, IP, e.table_attrs("filter")),
            (NFT_MSG_NEWCHAIN, NLM_F_CREATE, IP, e.chain_attrs("filter", base)),
        ]
    )
    node = NftablesNode(nft.socket(), (4,))
    try:
        once("nftables", node)
    finally:
        node.close()
    table = nft.table(IP, "kube-proxy")
    assert table is not None
    return sorted(table.chains)


def test_removing_the_nftables_mode_reports_its_chains_and_spares_other_tables(
    nft: FakeNfTables,
) -> None:
    chains = nftables_mode_chains(nft)
    foreign = copy.deepcopy(nft.table(IP, "filter"))
    removed = remove_nftables_mode(nft.socket)
    assert [(t.table, sorted(t.delete)) for t in removed] == [("ip kube-proxy", chains)]
    assert nft.table(IP, "kube-proxy") is None
    assert nft.table(IP, "filter") == foreign
    assert remove_nftables_mode(nft.socket) == []  # nothing left: nothing reported


def test_switching_to_iptables_counts_the_nftables_chains_removed(
    nft: FakeNfTables, leftovers: Leftovers
) -> None:
    chains = len(nftables_mode_chains(nft))
    leftovers.removals["nftables"] = lambda: remove_nftables_mode(nft.socket)
    summary, _ = once("iptables", IptablesNode({4: FakeDataplane()}, no_sysctls))
    assert f"removed {chains} chains ({chains} of another mode)" in summary, summary
    assert nft.table(IP, "kube-proxy") is None
