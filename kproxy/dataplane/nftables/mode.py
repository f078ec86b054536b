"""Opening the nftables mode on a node: both families when the namespace has IPv6, and, once
kproxy's tables are in, the iptables mode's chains removed (a node switching modes in place:
both hook in at the same priorities and the last loaded wins, so the new mode goes in first)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from kproxy.dataplane.base import TableReport
from kproxy.dataplane.host import ipv6_supported
from kproxy.dataplane.iptables.backends import remove_nft_backend
from kproxy.dataplane.iptables.families import open_dataplanes
from kproxy.dataplane.nftables.node import NftablesNode, open_nftables_node

log = structlog.get_logger("kproxy.dataplane")


LEGACY_TABLES = (Path("/proc/net/ip_tables_names"), Path("/proc/net/ip6_tables_names"))


def _legacy_tables_in_use() -> bool:
    """Whether this namespace has any legacy x_tables table: the kernel creates them on first
    use, so without one there is no iptables-mode chain to remove (and loading libiptc, about
    a second, is saved)."""
    for path in LEGACY_TABLES:
        try:
            if path.read_text().strip():
                return True
        except OSError:
            continue
    return False


def remove_iptables_mode(lock_timeout: float) -> list[TableReport]:
    """Delete the iptables (and userspace) mode's chains and the jumps to them, both families:
    per table, what was removed."""
    removed: list[TableReport] = list(remove_nft_backend(lock_timeout))  # iptables-nft nodes
    if _legacy_tables_in_use():
        with open_dataplanes(lock_timeout) as dataplanes:
            removed += [t for dp in dataplanes.values() for t in dp.cleanup().tables]
    chains = sum(len(t.delete) for t in removed)
    if chains:
        log.info("iptables_mode_removed", chains=chains)
    return removed


@contextmanager
def open_nftables_mode(lock_timeout: float) -> Iterator[NftablesNode]:
    families = (4, 6) if ipv6_supported() else (4,)
    with open_nftables_node(families, lambda: remove_iptables_mode(lock_timeout)) as node:
        yield node
