"""Facts about the node's own network namespace, and the sysctls kproxy sets there.

Read with pyroute2 (addresses) and /proc/sys (sysctls) of the namespace kproxy runs in."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import structlog
from pyroute2 import IPRoute

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo

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


def node_families() -> tuple[int, ...]:
    """The families kproxy programs here: IPv4, and IPv6 where the namespace has it."""
    return (4, 6) if ipv6_supported() else (4,)


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


# Writes a plan's sysctls (apply_sysctls; a no-op or a recorder in tests).
SysctlWriter = Callable[[Iterable[tuple[str, str]]], None]


def apply_sysctls(sysctls: Iterable[tuple[str, str]]) -> None:
    """Set the sysctls a node plan asks for, in this network namespace."""
    for name, value in sysctls:
        if write_sysctl(name, value):
            log.info("sysctl_set", name=name, value=value, reason="the rules rely on it")


def route_localnet_left() -> bool:
    """Whether route_localnet is on, which cleanup leaves as it is (as `kube-proxy --cleanup`
    does): nothing records whether kproxy or another program turned it on, and another may rely
    on it. Left on, it is still guarded: cleanup keeps KUBE-FIREWALL, which drops packets to
    127.0.0.0/8 that did not come from loopback."""
    return read_sysctl(ROUTE_LOCALNET) == "1"


CONNTRACK_TIMEOUTS = {
    "tcp_established_timeout": "net/netfilter/nf_conntrack_tcp_timeout_established",
    "tcp_close_wait_timeout": "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "udp_timeout": "net/netfilter/nf_conntrack_udp_timeout",
    "udp_stream_timeout": "net/netfilter/nf_conntrack_udp_timeout_stream",
}
CONNTRACK_MAX = "net/netfilter/nf_conntrack_max"


def in_host_network_namespace() -> bool:
    """Whether this process shares PID 1's network namespace (a hostNetwork pod, or the host)."""
    try:
        return os.readlink("/proc/self/ns/net") == os.readlink("/proc/1/ns/net")
    except OSError:
        return False


def machine_cpus() -> int:
    """The machine's CPUs, not only those this process may run on: nf_conntrack_max is one table
    for the whole host, and kube-proxy counts them so too (a CPU-pinned pod would otherwise size
    the host's table by its own share)."""
    return os.cpu_count() or len(os.sched_getaffinity(0))


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release such as `6.1.0-28-amd64`; (0, 0) if it has none."""
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def conntrack_max_target(max_per_core: int | None, minimum: int | None, cpus: int) -> int | None:
    """The nf_conntrack_max kproxy wants at least: `max_per_core` per CPU, never below `minimum`.
    None when max_per_core is unset (0 in the config): the node's limit is left, min included,
    as kube-proxy leaves it. The agent and `kproxy doctor` both judge by this."""
    if not max_per_core:
        return None
    return max(max_per_core * cpus, minimum or 0)


def tune_node(config: ProxyConfig) -> None:
    """What kube-proxy sets when it starts: its OOM score and the conntrack sysctls.

    The conntrack timeouts belong to this network namespace. nf_conntrack_max is one number for
    the whole host, so it is only set from the host's own network namespace."""
    if config.oom_score_adj is not None:
        _write_best_effort("/proc/self/oom_score_adj", str(config.oom_score_adj))
    conntrack = config.conntrack
    for attr, name in CONNTRACK_TIMEOUTS.items():
        seconds = getattr(conntrack, attr)
        if seconds is not None:
            _sysctl_best_effort(name, str(int(seconds)))
    wanted = conntrack_max_target(conntrack.max_per_core, conntrack.min, machine_cpus())
    if wanted is None:
        return
    if not in_host_network_namespace():
        log.info("conntrack_max_left", reason="not the host's network namespace", wanted=wanted)
        return
    current = read_sysctl(CONNTRACK_MAX)
    if current is not None and int(current) < wanted:
        _sysctl_best_effort(CONNTRACK_MAX, str(wanted))


def _sysctl_best_effort(name: str, value: str) -> None:
    try:
        if write_sysctl(name, value):
            log.info("sysctl_set", name=name, value=value)
    except OSError as exc:
        log.warning("sysctl_not_set", name=name, value=value, error=exc.strerror)


def _write_best_effort(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError as exc:
        log.warning("write_failed", path=path, error=exc.strerror)
