"""Which proxy mode this node's kernel shows, for `dump`, `trace` and `dump --diff` run without
`--config`: reading the iptables mode's chains on an nftables-mode node would answer "not a
Service" for every Service."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass

from kproxy.dataplane.readers import read_legacy_chains, read_nft_chains
from kproxy.errors import DataplaneError

NFT_TABLE = "kube-proxy"
# The userspace mode's portal chains (upstream's names); the iptables mode has none of them.
PORTAL_CHAINS = ("KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST")
SERVICES_CHAIN = "KUBE-SERVICES"


@dataclass(frozen=True, slots=True)
class LiveMode:
    mode: str
    found: str  # what in the kernel said so, for the one line the commands print


def decide_live_mode(nft_tables: Collection[str], nat_chains: Collection[str]) -> LiveMode:
    """The mode whose rules are present, from one family's nftables table names and legacy nat
    chain names: kproxy's nftables table first (a switch from the iptables mode adds it before
    removing the chains), then the userspace portals, then `KUBE-SERVICES`; else the default."""
    if NFT_TABLE in nft_tables:
        return LiveMode("nftables", f"nftables table {NFT_TABLE!r} found")
    for chain in PORTAL_CHAINS:
        if chain in nat_chains:
            return LiveMode("userspace", f"nat chain {chain} found")
    if SERVICES_CHAIN in nat_chains:
        return LiveMode("iptables", f"nat chain {SERVICES_CHAIN} found")
    return LiveMode("iptables", "no kproxy rules found; the default mode")


def detect_live_mode(family: int) -> LiveMode:
    """Read one family's nftables tables and legacy nat chains (nothing is written) and decide."""
    if os.geteuid() != 0:  # else libiptc's refusal says "to program", which no one asked for
        raise DataplaneError(
            "reading the live tables (and which mode wrote them) needs root (CAP_NET_ADMIN); "
            "without root, give --manifests PATH to work on what kproxy would write instead"
        )
    nft_family = "ip" if family == 4 else "ip6"
    found = read_nft_chains()
    tables = {table for fam, table, chain in found if fam == nft_family and not chain}
    # The iptables mode's chains on an iptables-nft node are in the family's nft `nat` table.
    nft_nat = {chain for fam, table, chain in found if fam == nft_family and table == "nat"}
    return decide_live_mode(tables, read_legacy_chains("nat", family) | nft_nat)


def describe_mode(live: LiveMode) -> str:
    """The stderr line: which mode's rules a command read, and why that one."""
    return f"kproxy: reading the {live.mode} mode's rules (no --config: {live.found})"
