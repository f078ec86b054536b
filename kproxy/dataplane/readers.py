"""Read-only views of the node's tables, links and routes, for `kproxy doctor`: the kernel reads
behind its checks, kept here so that only the dataplane imports python-iptables and pyroute2.
Nothing here writes anything: a legacy table is only opened when /proc says it already exists,
since opening one creates it."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kproxy.dataplane.nftables.families import NFT_FAMILIES

PROC = Path("/proc")


@dataclass(frozen=True)
class RouteLookup:
    address: str
    route: str | None  # "via 192.0.2.1 dev eth0", or None when there is none
    error: str = ""


def read_legacy_available() -> bool:
    """Whether this kernel has legacy x_tables: /proc lists their tables once ip_tables is loaded
    (python-iptables loads it on import)."""
    names = PROC / "net" / "ip_tables_names"
    if not names.exists():
        from kproxy.dataplane.xtables.backend import load_iptc

        with contextlib.suppress(Exception):  # no library, no module: no legacy tables either
            load_iptc()
    return names.exists()


def read_legacy_chains(table: str, family: int = 4) -> frozenset[str]:
    """Chain names of a legacy (x_tables) table; empty when this namespace has no such table."""
    names = PROC / "net" / ("ip_tables_names" if family == 4 else "ip6_tables_names")
    try:
        existing = names.read_text().split()
    except FileNotFoundError:  # no ip_tables module: no legacy table at all
        return frozenset()
    if table not in existing:
        return frozenset()
    from kproxy.dataplane.xtables.backend import load_iptc

    iptc = load_iptc()
    # autocommit=False: a refresh with autocommit on would commit (rewrite) the table.
    handle = (iptc.Table if family == 4 else iptc.Table6)(table, autocommit=False)
    handle.refresh()
    return frozenset(str(chain.name) for chain in handle.chains)


def read_nft_chains() -> frozenset[tuple[str, str, str]]:
    """(family, table, chain) of every nftables chain, plus (family, table, "") per table."""
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.nftables.main import NFTables

    no_nftables = (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.EOPNOTSUPP)
    try:
        nft = NFTables(nfgen_family=0)  # NFPROTO_UNSPEC: every family
    except OSError as exc:
        if exc.errno in no_nftables:  # a kernel without nfnetlink: no nftables rules either
            return frozenset()
        raise
    try:
        tables = nft.get_tables()
        chains = nft.get_chains()
    except NetlinkError as exc:
        if exc.code in no_nftables:
            return frozenset()
        raise
    finally:
        nft.close()
    found = {
        (NFT_FAMILIES.get(t["nfgen_family"], "?"), str(t.get_attr("NFTA_TABLE_NAME")), "")
        for t in tables
    }
    found |= {
        (
            NFT_FAMILIES.get(c["nfgen_family"], "?"),
            str(c.get_attr("NFTA_CHAIN_TABLE")),
            str(c.get_attr("NFTA_CHAIN_NAME")),
        )
        for c in chains
    }
    return frozenset(found)


def read_links() -> dict[str, str]:
    """Interface name -> kind (`bridge`, `veth`, ..., "" for none) in this namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {
            str(link.get("ifname")): str(link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "")
            for link in ipr.get_links()
        }


def read_routes(addresses: Iterable[str]) -> list[RouteLookup]:
    """The kernel's route choice for each address (`ip route get`)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    lookups = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        for address in addresses:
            try:
                route = ipr.route("get", dst=address)[0]
            except NetlinkError as exc:
                lookups.append(RouteLookup(address, None, os.strerror(exc.code)))
                continue
            gateway = route.get("RTA_GATEWAY")
            device = names.get(route.get("RTA_OIF"), "?")
            lookups.append(
                RouteLookup(address, (f"via {gateway} " if gateway else "") + f"dev {device}")
            )
    return lookups
