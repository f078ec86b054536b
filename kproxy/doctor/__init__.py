"""`kproxy doctor`: what kproxy needs from the node and does not set up itself.

Each check reads facts of the network namespace it runs in (the legacy tables, nftables, links and
routes through the dataplane's readers, sysctls and processes from /proc), then judges them in a
pure function, so the verdicts can be tested without a kernel. Nothing here writes anything: the
legacy tables are only opened when /proc says they already exist, since opening one creates it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from functools import cached_property

from kproxy.dataplane.base import NodeNeeds
from kproxy.dataplane.host import machine_cpus
from kproxy.dataplane.host import read_sysctl as _read_proc_sysctl
from kproxy.dataplane.readers import (
    read_legacy_available,
    read_links,
    read_nft_chains,
    read_routes,
)
from kproxy.dataplane.xtables.detect import BackendFacts, decide_backend, read_backend_facts
from kproxy.doctor.facts import (
    DEFAULT_SERVICE_CIDR,
    HINT_CHAINS,
    IPVS_INTERFACE,
    read_all_legacy_chains,
    read_proxy_processes,
)
from kproxy.doctor.judges import (
    Check,
    ConntrackLimits,
    conntrack_limits,
    judge_backend,
    judge_bridge_nf_call,
    judge_conntrack,
    judge_forwarding,
    judge_leftovers,
    judge_proxy_mode,
    judge_proxy_processes,
    judge_service_route,
)
from kproxy.errors import ConfigError
from kproxy.model.config import ProxyConfig
from kproxy.model.config_values import DEFAULT_MODE


def read_sysctl(name: str) -> str | None:
    """A sysctl by its dotted name (`net.ipv4.ip_forward`) in this network namespace."""
    return _read_proc_sysctl(name.replace(".", "/"))


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:  # one check that cannot read its facts must not hide the others
        return Check(
            name,
            "warn",
            f"could not check: {exc}",
            "run the doctor as root in the node's network namespace",
        )


def _service_route(cidr: str) -> Check:
    network = ipaddress.ip_network(cidr, strict=False)
    ends = {network[1] if network.num_addresses > 2 else network[0], network[-2]}
    return judge_service_route(str(network), read_routes(str(a) for a in sorted(ends)))


def _conntrack(limits: ConntrackLimits) -> Check:
    current = read_sysctl("net.netfilter.nf_conntrack_max")
    return judge_conntrack(int(current) if current else None, machine_cpus(), limits)


def _uses_ipv6(config: ProxyConfig, service_cidr: str) -> bool:
    cidrs = (*config.cluster_cidrs, service_cidr)
    return any(ipaddress.ip_network(c, strict=False).version == 6 for c in cidrs)


class _NodeChains:
    """The chain names of the node's x_tables, read at first use (inside a guarded check) and
    once per doctor run: several checks judge by them."""

    @cached_property
    def legacy(self) -> frozenset[str]:
        return read_all_legacy_chains()

    @cached_property
    def nft(self) -> frozenset[tuple[str, str, str]]:
        return read_nft_chains()

    def legacy_hints(self) -> frozenset[str]:
        """kubelet's hint chains in the legacy mangle tables."""
        return frozenset(HINT_CHAINS) & self.legacy

    def nft_hints(self) -> frozenset[str]:
        """kubelet's hint chains in nftables' mangle tables (iptables-nft)."""
        return frozenset(c for _, t, c in self.nft if t == "mangle" and c in HINT_CHAINS)

    def backend_facts(self) -> BackendFacts:
        """What the iptables mode's backend detection reads; its rule counts only when no hint
        decides (as the detection itself does)."""
        legacy, nft = self.legacy_hints(), self.nft_hints()
        return BackendFacts(nft, legacy, 0, 0) if legacy or nft else read_backend_facts()


def _backend_for(config: ProxyConfig, needs: NodeNeeds) -> str:
    """The x_tables backend a mode writes as configured: the iptables mode's iptablesBackend
    (`auto`: kubelet's); a mode of the legacy tables (the userspace portals), legacy."""
    return config.iptables_backend if needs.tables == "xtables" else "legacy"


def _kept(config: ProxyConfig, needs: NodeNeeds, chains: _NodeChains) -> str:
    """Where the configured mode's own rules are, which a running proxy keeps up to date."""
    if needs.tables == "nftables":
        return "nftables"
    backend = _backend_for(config, needs)
    facts = chains.backend_facts() if backend == "auto" else None
    return "iptables-nft" if decide_backend(backend, facts).backend == "nft" else "legacy"


def _mode_checks(
    config: ProxyConfig, modes: Mapping[str, NodeNeeds], chains: _NodeChains
) -> list[Check]:
    """Whether the configured mode suits the node, and for a mode writing the legacy tables,
    whether they are the backend kubelet uses."""
    checks = [
        _guarded(
            "proxy-mode",
            lambda: judge_proxy_mode(
                config.mode,
                modes,
                os.uname().release,
                read_legacy_available(),
                chains.legacy_hints(),
                chains.nft_hints(),
            ),
        ),
    ]
    needs = modes[config.mode or DEFAULT_MODE]
    if needs.tables != "nftables":
        checks.append(
            _guarded(
                "iptables-backend",
                lambda: judge_backend(
                    chains.legacy_hints(), chains.nft_hints(), _backend_for(config, needs)
                ),
            )
        )
    return checks


def run_checks(
    config: ProxyConfig,
    service_cidr: str | None = None,
    conntrack: ConntrackLimits | None = None,
    *,
    modes: Mapping[str, NodeNeeds],
) -> list[Check]:
    """Every check, in the network namespace this process runs in; `modes`: what each proxy
    mode needs of the node (sync/modes.py's mode_needs()). Raises ConfigError for a service
    CIDR that is not one."""
    cidr = service_cidr or DEFAULT_SERVICE_CIDR
    try:
        ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise ConfigError(f"--service-cidr {cidr!r} is not a CIDR ({exc})") from exc
    limits = conntrack or conntrack_limits(config)
    forward = "net.ipv4.ip_forward"
    chains = _NodeChains()
    checks = _mode_checks(config, modes, chains)
    checks += [
        _guarded("service-route", lambda: _service_route(cidr)),
        _guarded("ip-forward", lambda: judge_forwarding(forward, read_sysctl(forward))),
    ]
    if _uses_ipv6(config, cidr):
        v6 = "net.ipv6.conf.all.forwarding"
        checks.append(
            _guarded("ipv6-forward", lambda: judge_forwarding(v6, read_sysctl(v6), "ipv6-forward"))
        )
    checks += [
        _guarded(
            "bridge-nf-call-iptables",
            lambda: judge_bridge_nf_call(
                [n for n, kind in read_links().items() if kind == "bridge" and n != IPVS_INTERFACE],
                read_sysctl("net.bridge.bridge-nf-call-iptables"),
            ),
        ),
        _guarded("conntrack-max", lambda: _conntrack(limits)),
    ]
    checks += [
        _guarded(
            "kube-proxy-leftovers",
            lambda: judge_leftovers(
                chains.legacy,
                chains.nft,
                read_links(),
                read_proxy_processes(),
                config.mode,
                _kept(config, modes[config.mode or DEFAULT_MODE], chains),
            ),
        ),
        _guarded("kube-proxy-process", lambda: judge_proxy_processes(read_proxy_processes())),
    ]
    return checks


_LABELS = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}


def render_report(checks: list[Check]) -> str:
    """One verdict line per check, what to do under each that is not ok, and a summary."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        lines.append(f"{_LABELS[check.status]:<4}  {check.name:<{width}}  {check.detail}")
        if check.status != "ok" and check.advice:
            lines.append(f"{'':<4}  {'':<{width}}  -> {check.advice}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    if failed:
        verdict = f"{failed} failed, {_warnings(warned)}: fix the failures before running kproxy"
    elif warned:
        verdict = f"no failures, {_warnings(warned)}: kproxy can run; read the warnings"
    else:
        verdict = f"all {len(checks)} checks passed"
    return "\n".join([*lines, "", verdict]) + "\n"


def _warnings(count: int) -> str:
    return f"{count} warning" + ("" if count == 1 else "s")


def exit_code(checks: list[Check]) -> int:
    """1 when any check failed, else 0 (warnings do not fail)."""
    return 1 if any(c.status == "fail" for c in checks) else 0
