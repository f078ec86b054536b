"""Facts about the node's own network namespace, and the sysctls kproxy sets there.

Read with pyroute2 (addresses) and /proc/sys (sysctls) of the namespace kproxy runs in."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import structlog
from pyroute2 import IPRoute

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.plan.ruleset import needs_route_localnet

log = structlog.get_logger("kproxy.dataplane")
PROC_SYS = Path("/proc/sys")
TCP_BE_LIBERAL = "net/netfilter/nf_conntrack_tcp_be_liberal"
ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"


def read_local_addresses() -> tuple[str, ...]:
    """Every address configured on an interface of this namespace, both families."""
    with IPRoute() as ipr:
        found = {
            str(msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL"))
            for family in (socket.AF_INET, socket.AF_INET6)
            for msg in ipr.get_addr(family=family)
        }
    return tuple(sorted(a for a in found if a and a != "None" and not a.startswith("fe80:")))


def ipv6_supported() -> bool:
    """IPv6 is enabled in this namespace, so its ip6tables tables are programmed too."""
    return Path("/proc/net/if_inet6").exists()


def read_sysctl(name: str) -> str | None:
    try:
        return (PROC_SYS / name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> bool:
    """Set a sysctl of this namespace; True when it changed."""
    if read_sysctl(name) == value:
        return False
    (PROC_SYS / name).write_text(value)
    return True


def with_host_facts(node: NodeInfo) -> NodeInfo:
    """`node` completed with what this namespace holds."""
    return replace(
        node,
        local_addresses=read_local_addresses(),
        tcp_be_liberal=read_sysctl(TCP_BE_LIBERAL) not in (None, "0"),
    )


def prepare_host(config: ProxyConfig) -> None:
    """Sysctls the rules rely on, in this network namespace."""
    if needs_route_localnet(config) and write_sysctl(ROUTE_LOCALNET, "1"):
        log.info("sysctl_set", name=ROUTE_LOCALNET, value="1", reason="localhost NodePorts")
