"""Opening the nftables mode on a node: both families when the namespace has IPv6, and, once
kproxy's tables are in, the iptables mode's chains removed (a node switching modes in place:
both hook in at the same priorities and the last loaded wins, so the new mode goes in first)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from kproxy.dataplane.base import ModeDataplane, TableReport
from kproxy.dataplane.host import ipv6_supported
from kproxy.dataplane.iptables.families import open_dataplanes
from kproxy.dataplane.localhost_nodeports import WithLocalhostNodePorts, open_localhost_node_ports
from kproxy.dataplane.nftables.node import open_nftables_node
from kproxy.model.config import ProxyConfig
from kproxy.plan.localhost_nodeports import serves_localhost

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
    if not _legacy_tables_in_use():
        return []
    with open_dataplanes(lock_timeout) as dataplanes:
        removed = [t for dp in dataplanes.values() for t in dp.cleanup().tables]
    chains = sum(len(t.delete) for t in removed)
    if chains:
        log.info("iptables_mode_removed", chains=chains)
    return removed


@contextmanager
def open_nftables_mode(
    lock_timeout: float, config: ProxyConfig | None = None
) -> Iterator[ModeDataplane]:
    """The mode's node dataplane; with the KubeProxyNFTablesLocalhostNodePorts gate, composed
    with the relay's listeners on 127.0.0.1 and ::1 (none run without it, as upstream)."""
    families = (4, 6) if ipv6_supported() else (4,)
    with open_nftables_node(families, lambda: remove_iptables_mode(lock_timeout)) as node:
        served = tuple(f for f in families if config and serves_localhost(config, f))
        if not served:
            yield node
            return
        with open_localhost_node_ports(served) as localhost:
            yield WithLocalhostNodePorts(node, localhost)
