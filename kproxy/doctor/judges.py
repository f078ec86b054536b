"""`kproxy doctor`'s verdicts: pure functions of the facts read from the node, so each can be
tested without a kernel."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from kproxy.dataplane.base import NodeNeeds
from kproxy.dataplane.host import conntrack_max_target, kernel_version
from kproxy.dataplane.readers import RouteLookup
from kproxy.doctor.facts import (
    HINT_CHAINS,
    IPVS_CHAINS,
    IPVS_INTERFACE,
    ProxyProcess,
)
from kproxy.model.config import ConntrackConfig, ProxyConfig
from kproxy.model.config_values import DEFAULT_MODE
from kproxy.plan.iptables.chains import is_owned_chain
from kproxy.plan.iptables.naming import SERVICE_CHAIN_PREFIXES, is_service_chain
from kproxy.plan.nftables.naming import TABLE as NFT_PROXY_TABLE

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    advice: str = ""


_CONNTRACK_DEFAULTS = ConntrackConfig()


@dataclass(frozen=True)
class ConntrackLimits:
    """KubeProxyConfiguration's conntrack.maxPerCore and conntrack.min, 0 for unset; the defaults
    are the config's."""

    max_per_core: int = _CONNTRACK_DEFAULTS.max_per_core or 0
    min: int = _CONNTRACK_DEFAULTS.min or 0


def conntrack_limits(config: ProxyConfig) -> ConntrackLimits:
    """The limits kproxy applies (None, from a 0 in the config, leaves the node's own)."""
    return ConntrackLimits(config.conntrack.max_per_core or 0, config.conntrack.min or 0)


# --- judging --------------------------------------------------------------------------------


def _names(chains: list[str]) -> str:
    """`A is` / `A and B are`."""
    return " and ".join(chains) + (" is" if len(chains) == 1 else " are")


def judge_backend(legacy: Iterable[str], nft: Iterable[str], configured: str = "auto") -> Check:
    """`legacy`/`nft`: kubelet hint chains found in each backend's mangle tables; `configured`:
    the config's iptablesBackend. kproxy writes where kubelet does unless told otherwise."""
    name = "iptables-backend"
    legacy, nft = sorted(set(legacy)), sorted(set(nft))
    kubelet = "nft" if nft else "legacy" if legacy else None
    if kubelet is None:
        writes = configured if configured != "auto" else "nft unless legacy holds more rules"
        return Check(
            name,
            "warn",
            f"neither backend holds kubelet's {' or '.join(HINT_CHAINS)} (kubelet older than "
            "1.24, not running, or this is not the node's network namespace): kproxy writes "
            f"{writes}",
            "check that `iptables --version` on the node names the backend kproxy writes, or set "
            "iptablesBackend (legacy or nft) in the config",
        )
    where = f"kubelet's {_names(nft or legacy)} in the {kubelet} mangle table"
    if configured not in ("auto", kubelet):
        return Check(
            name,
            "fail",
            f"{where}, but iptablesBackend: {configured} makes kproxy write {configured}: its "
            "rules would run beside kubelet's and the CNI plugin's instead of with them",
            f"set iptablesBackend: auto (or {kubelet}) in the config",
        )
    if legacy and nft:
        return Check(
            name,
            "warn",
            f"kubelet's hint chains are in both backends (legacy: {', '.join(legacy)}; "
            f"nft: {', '.join(nft)}): the node changed backends without a reboot; kproxy "
            "writes nft, as upstream's image decides",
            "reboot the node, so only one backend holds rules",
        )
    return Check(name, "ok", f"{where}, where kproxy writes (iptables-{kubelet})")


def _version(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def judge_proxy_mode(
    mode: str,
    modes: Mapping[str, NodeNeeds],
    kernel_release: str,
    legacy_tables: bool,
    legacy: Iterable[str],
    nft: Iterable[str],
) -> Check:
    """Which proxy mode suits this node, against the one configured. `modes`: what each mode
    needs of the node; `legacy_tables`: the kernel has legacy x_tables; `legacy`/`nft`:
    kubelet's hint chains found in each backend."""
    name = "proxy-mode"
    mode = mode or DEFAULT_MODE
    needs, kernel = modes[mode], kernel_version(kernel_release)
    carried = [m for m, n in modes.items() if kernel >= n.min_kernel]
    legacy_modes = [m for m in carried if modes[m].tables != "nftables"]
    nft_modes = [m for m in carried if modes[m].tables == "nftables"]
    kubelet_nft = bool(set(nft)) and not set(legacy)
    if kernel < needs.min_kernel:
        return Check(
            name,
            "fail",
            f"mode {mode} needs kernel >= {_version(needs.min_kernel)}; this node runs "
            f"{kernel_release}",
            f"use `mode: {legacy_modes[0]}` on this node" if legacy_modes else "",
        )
    if needs.tables == "nftables":
        why = "kubelet uses iptables-nft" if kubelet_nft else "its own table, beside any other"
        return Check(name, "ok", f"mode {mode} suits this node (kernel {kernel_release}; {why})")
    if needs.tables == "xtables" and kubelet_nft:
        return Check(name, "ok", f"mode {mode} writes iptables-nft here, as kubelet does")
    use_nft = f"use `mode: {nft_modes[0]}`" if nft_modes else ""
    if not legacy_tables:
        newest = max((n.min_kernel for n in modes.values() if n.tables == "nftables"), default=None)
        upgrade = f"upgrade the kernel to >= {_version(newest)}" if newest else ""
        return Check(
            name,
            "fail",
            f"this kernel has no legacy x_tables (ip_tables), which mode {mode} writes",
            use_nft or upgrade,
        )
    if kubelet_nft:
        return Check(
            name,
            "warn",
            f"kubelet uses iptables-nft, so mode {mode}'s legacy rules run beside its rules",
            use_nft or "see iptables-backend",
        )
    also = f"; mode {nft_modes[0]} would suit it too (kernel {kernel_release})" if nft_modes else ""
    return Check(name, "ok", f"mode {mode} suits this node (legacy x_tables{also})")


def judge_service_route(cidr: str, lookups: list[RouteLookup]) -> Check:
    name = "service-route"
    missing = [lk for lk in lookups if lk.route is None]
    if not missing:
        routes = "; ".join(f"{lk.address} {lk.route}" for lk in lookups)
        return Check(name, "ok", f"the service range {cidr} is routed ({routes})")
    first = missing[0]
    return Check(
        name,
        "fail",
        f"no route to {first.address} in the service range {cidr} ({first.error}): connections "
        "from the node itself to Service IPs fail before the nat table can rewrite them",
        f"give the node a default route, or a route for {cidr} (`ip route add {cidr} dev "
        "<main interface>`); pass --service-cidr if your service range is another",
    )


def judge_forwarding(sysctl: str, value: str | None, name: str = "ip-forward") -> Check:
    if value == "1":
        return Check(name, "ok", f"{sysctl} is 1")
    return Check(
        name,
        "fail",
        f"{sysctl} is {value or 'missing'}: the node drops packets DNATed to pods and to "
        "endpoints on other nodes",
        f"sysctl -w {sysctl}=1, and persist it in /etc/sysctl.d/ (CNI plugins usually set it)",
    )


def judge_bridge_nf_call(bridges: list[str], value: str | None) -> Check:
    name = "bridge-nf-call-iptables"
    if not bridges:
        return Check(name, "ok", "no bridge interface: bridged traffic needs no iptables here")
    listed = ", ".join(sorted(bridges))
    if value == "1":
        return Check(name, "ok", f"net.bridge.bridge-nf-call-iptables is 1 (bridges: {listed})")
    why = "br_netfilter is not loaded" if value is None else "bridge-nf-call-iptables is 0"
    return Check(
        name,
        "fail",
        f"bridge interfaces exist ({listed}) but {why}: traffic between pods on one bridge skips "
        "iptables, so a pod that reaches a Service whose endpoint is on the same bridge gets "
        "replies from the wrong address",
        "modprobe br_netfilter && sysctl -w net.bridge.bridge-nf-call-iptables=1, and persist "
        "both (/etc/modules-load.d/, /etc/sysctl.d/)",
    )


def judge_conntrack(current: int | None, cores: int, limits: ConntrackLimits) -> Check:
    name = "conntrack-max"
    wanted = conntrack_max_target(limits.max_per_core, limits.min, cores)
    if wanted is None:
        return Check(name, "ok", "conntrack.maxPerCore is 0: the node's own limit is kept")
    formula = f"max({limits.max_per_core} x {cores} cores, {limits.min}) = {wanted}"
    if current is None:
        return Check(
            name,
            "warn",
            "nf_conntrack is not loaded yet, so its table size cannot be read",
            "run the doctor again once kproxy has synced (its NAT rules load nf_conntrack)",
        )
    if current >= wanted:
        return Check(name, "ok", f"nf_conntrack_max is {current}, at least {formula}")
    return Check(
        name,
        "warn",
        f"nf_conntrack_max is {current}, below {formula}, which kproxy sets when it starts in "
        "the host's network namespace; until then a busy node can fill the table",
        f"sysctl -w net.netfilter.nf_conntrack_max={wanted} and persist it in /etc/sysctl.d/, "
        "or lower conntrack.maxPerCore/min in the config",
    )


def _summarise(chains: list[str]) -> str:
    """`KUBE-SERVICES, KUBE-POSTROUTING, 12 KUBE-SVC-*, 30 KUBE-SEP-*`."""
    per_service = Counter(p for c in chains for p in SERVICE_CHAIN_PREFIXES if c.startswith(p))
    top = [c for c in chains if not is_service_chain(c)]
    return ", ".join([*top, *(f"{n} {p}*" for p, n in sorted(per_service.items()))])


@dataclass(frozen=True)
class _Leftovers:
    """What `kproxy cleanup` removes, per kind of tables: "legacy" (the iptables and userspace
    modes' chains) and "nftables" (the `kube-proxy` tables); and what only `kube-proxy --cleanup`
    does, by its --proxy-mode."""

    cleanable: dict[str, str]
    other: dict[str, str]


def _leftover_parts(
    chains: frozenset[str], nft: frozenset[tuple[str, str, str]], links: Iterable[str]
) -> _Leftovers:
    owned = sorted(c for c in chains if is_owned_chain(c))
    cleanable = {}
    if owned:
        cleanable["legacy"] = f"kube-proxy chains in the legacy tables ({_summarise(owned)})"
    nft_tables = sorted({f"{fam} {table}" for fam, table, _ in nft if table == NFT_PROXY_TABLE})
    if nft_tables:
        cleanable["nftables"] = f"nftables mode tables ({', '.join(nft_tables)})"
    other = {}
    ipvs = sorted(chains & IPVS_CHAINS)
    if IPVS_INTERFACE in links or ipvs:
        found = [IPVS_INTERFACE] if IPVS_INTERFACE in links else []
        other["ipvs"] = f"IPVS mode state ({', '.join(found + ipvs)})"
    nft_chains = sorted({c for _, t, c in nft if c and t != NFT_PROXY_TABLE and is_owned_chain(c)})
    if nft_chains:
        cleanable["iptables-nft"] = (
            f"kube-proxy chains in the iptables-nft tables ({_summarise(nft_chains)})"
        )
    return _Leftovers(cleanable, other)


def judge_leftovers(
    chains: frozenset[str],
    nft: frozenset[tuple[str, str, str]],
    links: Iterable[str],
    proxies: list[ProxyProcess],
    mode: str = DEFAULT_MODE,
    kept: str = "legacy",
) -> Check:
    """`chains`: legacy chain names; `nft`: read_nft_chains(); `links`: interface names; `mode`:
    the configured proxy mode, whose own rules (in `kept`: "legacy", "iptables-nft" or
    "nftables") a running proxy keeps up to date."""
    name = "kube-proxy-leftovers"
    found = _leftover_parts(chains, nft, set(links))
    running = " and ".join(sorted({p.program for p in proxies}))
    if not found.cleanable and not found.other:
        return Check(name, "ok", "no kube-proxy rules or IPVS state")
    stale = {kind: text for kind, text in found.cleanable.items() if kind != kept or not running}
    if running and not stale and not found.other:
        return Check(
            name, "ok", f"{found.cleanable[kept]}, kept up to date by the running {running}"
        )
    advice = []
    if stale and not running:
        advice.append("run `kproxy cleanup` (or start kproxy, which takes these over)")
    elif stale:
        advice.append(
            f"the running {running} (mode {mode or DEFAULT_MODE}) removes the other mode's rules "
            "at its first sync: restart it, or stop it and run `kproxy cleanup`"
        )
    if found.other:
        modes = " and ".join(f"--proxy-mode={m}" for m in sorted(found.other))
        advice.append(
            f"stop kube-proxy, then run `kube-proxy --cleanup` once with {modes} (from the "
            "kube-proxy image): kproxy cleanup does not remove IPVS state"
        )
    detail = "found " + "; ".join([*stale.values(), *found.other.values()])
    if not running:
        detail += ", and no proxy runs in this namespace"
    return Check(name, "fail", detail, "; ".join(advice))


def judge_proxy_processes(proxies: list[ProxyProcess]) -> Check:
    name = "kube-proxy-process"
    upstream = [p for p in proxies if p.program == "kube-proxy"]
    if not upstream:
        return Check(name, "ok", "no kube-proxy process in this network namespace")
    pids = ", ".join(str(p.pid) for p in upstream)
    return Check(
        name,
        "fail",
        f"kube-proxy runs in this network namespace (pid {pids}): it writes the same chains as "
        "kproxy, and the two would undo each other's changes",
        "stop kube-proxy on this node first (see Migrate from kube-proxy in the operator guide)",
    )


# --- running and reporting ------------------------------------------------------------------
