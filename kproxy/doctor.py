"""`kproxy doctor`: what kproxy needs from the node and does not set up itself.

Each check reads facts of the network namespace it runs in (python-iptables for the legacy tables,
pyroute2 for links, routes and nftables, /proc for sysctls and processes), then judges them in a
pure function, so the verdicts can be tested without a kernel. Nothing here writes anything: the
legacy tables are only opened when /proc says they already exist, since opening one creates it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kproxy.dataplane.diff import is_owned_chain
from kproxy.errors import ConfigError
from kproxy.model.config import ProxyConfig
from kproxy.plan.naming import SERVICE_CHAIN_PREFIXES, is_service_chain

Status = Literal["ok", "warn", "fail"]
DEFAULT_SERVICE_CIDR = "10.96.0.0/12"  # kubeadm's default --service-cluster-ip-range
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")  # kubelet's, in its backend's mangle
LEGACY_TABLES = ("filter", "nat", "mangle")
IPVS_INTERFACE = "kube-ipvs0"
# Chains only kube-proxy's IPVS mode creates (it shares KUBE-SERVICES & co. with iptables mode).
IPVS_CHAINS = frozenset(
    {
        "KUBE-NODE-PORT",
        "KUBE-LOAD-BALANCER",
        "KUBE-LOOP-BACK",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
        "KUBE-SOURCE-RANGES-FIREWALL",
    }
)
NFT_PROXY_TABLE = "kube-proxy"  # kube-proxy's nftables mode
NFT_FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
PROC = Path("/proc")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    advice: str = ""


@dataclass(frozen=True)
class ConntrackLimits:
    """KubeProxyConfiguration's conntrack.maxPerCore and conntrack.min (kube-proxy's defaults)."""

    max_per_core: int = 32768
    min: int = 131072


@dataclass(frozen=True)
class ProxyProcess:
    pid: int
    program: Literal["kube-proxy", "kproxy"]
    command: str


@dataclass(frozen=True)
class RouteLookup:
    address: str
    route: str | None  # "via 192.0.2.1 dev eth0", or None when there is none
    error: str = ""


# --- reading the node -----------------------------------------------------------------------


def read_sysctl(name: str) -> str | None:
    """`net.ipv4.ip_forward` of this network namespace, or None when the kernel has no such key."""
    try:
        return (PROC / "sys" / name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def read_legacy_chains(table: str, family: int = 4) -> frozenset[str]:
    """Chain names of a legacy (x_tables) table; empty when this namespace has no such table."""
    names = PROC / "net" / ("ip_tables_names" if family == 4 else "ip6_tables_names")
    try:
        existing = names.read_text().split()
    except FileNotFoundError:  # no ip_tables module: no legacy table at all
        return frozenset()
    if table not in existing:
        return frozenset()
    from kproxy.dataplane.iptables import load_iptc

    iptc = load_iptc()
    # autocommit=False: a refresh with autocommit on would commit (rewrite) the table.
    handle = (iptc.Table if family == 4 else iptc.Table6)(table, autocommit=False)
    handle.refresh()
    return frozenset(str(chain.name) for chain in handle.chains)


def read_all_legacy_chains() -> frozenset[str]:
    return frozenset().union(*(read_legacy_chains(t, f) for t in LEGACY_TABLES for f in (4, 6)))


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


def classify_process(comm: str, argv: list[str]) -> Literal["kube-proxy", "kproxy"] | None:
    names = [os.path.basename(arg) for arg in argv[:3]]
    if comm == "kube-proxy" or names[:1] == ["kube-proxy"]:
        return "kube-proxy"
    for i, name in enumerate(names):
        if name in ("kproxy", "kproxy.cli") and "run" in argv[i + 1 :]:
            return "kproxy"
    return None


def read_proxy_processes() -> list[ProxyProcess]:
    """kube-proxy and `kproxy run` processes in this network namespace (a proxy elsewhere, in a
    test namespace say, programs other tables). Only processes of this PID namespace are seen."""
    own = os.readlink(PROC / "self" / "ns" / "net")
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "ns" / "net") != own:
                continue
            comm = (entry / "comm").read_text().strip()
            argv = [
                a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")
            ]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        program = classify_process(comm, argv)
        if program is not None:
            found.append(ProxyProcess(int(entry.name), program, " ".join(argv).strip()))
    return sorted(found, key=lambda p: p.pid)


def conntrack_limits(config: ProxyConfig) -> ConntrackLimits:
    """The limits kproxy applies (None, from a 0 in the config, leaves the node's own)."""
    return ConntrackLimits(config.conntrack.max_per_core or 0, config.conntrack.min or 0)


# --- judging --------------------------------------------------------------------------------


def _names(chains: list[str]) -> str:
    """`A is` / `A and B are`."""
    return " and ".join(chains) + (" is" if len(chains) == 1 else " are")


def judge_backend(legacy: Iterable[str], nft: Iterable[str]) -> Check:
    """`legacy`/`nft`: kubelet hint chains found in each backend's mangle tables."""
    name = "iptables-backend"
    legacy, nft = sorted(set(legacy)), sorted(set(nft))
    if nft and not legacy:
        return Check(
            name,
            "fail",
            f"kubelet's {_names(nft)} in the nftables mangle table: this node's iptables "
            "is iptables-nft, but kproxy writes the legacy tables (libiptc), so its rules would "
            "run beside kubelet's and the CNI plugin's instead of with them",
            "switch the node to iptables-legacy (`update-alternatives --set iptables "
            "/usr/sbin/iptables-legacy`, the same for ip6tables) and reboot it, so kubelet and "
            "the CNI plugin recreate their rules in the legacy tables; or keep kube-proxy here",
        )
    if legacy and nft:
        return Check(
            name,
            "warn",
            f"kubelet's hint chains are in both backends (legacy: {', '.join(legacy)}; "
            f"nftables: {', '.join(nft)}): the node changed backends without a reboot",
            "reboot the node once iptables points at iptables-legacy, so only one backend holds "
            "rules",
        )
    if legacy:
        return Check(
            name,
            "ok",
            f"kubelet's {_names(legacy)} in the legacy mangle table, where kproxy writes",
        )
    return Check(
        name,
        "warn",
        f"neither backend holds kubelet's {' or '.join(HINT_CHAINS)} (kubelet older than 1.24, "
        "not running, or this is not the node's network namespace): cannot tell which iptables "
        "backend the node uses",
        "check that `iptables --version` on the node says `(legacy)`: kproxy writes the legacy "
        "tables",
    )


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
    if limits.max_per_core == 0:
        return Check(name, "ok", "conntrack.maxPerCore is 0: the node's own limit is kept")
    wanted = max(limits.max_per_core * cores, limits.min)
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


def _leftover_parts(
    chains: frozenset[str], nft: frozenset[tuple[str, str, str]], links: Iterable[str]
) -> tuple[list[str], dict[str, str]]:
    """What `kproxy cleanup` removes, as phrases; and what it does not, by the --proxy-mode
    whose `kube-proxy --cleanup` does."""
    owned = sorted(c for c in chains if is_owned_chain(c))
    cleanable = [f"kube-proxy chains in the legacy tables ({_summarise(owned)})"] if owned else []
    other = {}
    ipvs = sorted(chains & IPVS_CHAINS)
    if IPVS_INTERFACE in links or ipvs:
        found = [IPVS_INTERFACE] if IPVS_INTERFACE in links else []
        other["ipvs"] = f"IPVS mode state ({', '.join(found + ipvs)})"
    nft_tables = sorted({f"{fam} {table}" for fam, table, _ in nft if table == NFT_PROXY_TABLE})
    if nft_tables:
        other["nftables"] = f"nftables mode tables ({', '.join(nft_tables)})"
    nft_chains = sorted({c for _, _, c in nft if c and is_owned_chain(c)})
    if nft_chains:
        other["iptables"] = f"kube-proxy chains in iptables-nft tables ({_summarise(nft_chains)})"
    return cleanable, other


def judge_leftovers(
    chains: frozenset[str],
    nft: frozenset[tuple[str, str, str]],
    links: Iterable[str],
    proxies: list[ProxyProcess],
) -> Check:
    """`chains`: legacy chain names; `nft`: read_nft_chains(); `links`: interface names."""
    name = "kube-proxy-leftovers"
    cleanable, other = _leftover_parts(chains, nft, set(links))
    running = " and ".join(sorted({p.program for p in proxies}))
    if not cleanable and not other:
        return Check(name, "ok", "no kube-proxy rules or IPVS state")
    if running and not other:
        return Check(name, "ok", f"{cleanable[0]}, kept up to date by the running {running}")
    advice = []
    if cleanable and not running:
        advice.append("run `kproxy cleanup` (or start kproxy, which takes these chains over)")
    if other:
        modes = " and ".join(f"--proxy-mode={mode}" for mode in sorted(other))
        advice.append(
            f"stop kube-proxy, then run `kube-proxy --cleanup` once with {modes} (from the "
            "kube-proxy image): kproxy cleanup only removes chains from the legacy tables"
        )
    detail = "found " + "; ".join([*cleanable, *other.values()])
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
    cores = len(os.sched_getaffinity(0))
    return judge_conntrack(int(current) if current else None, cores, limits)


def _uses_ipv6(config: ProxyConfig, service_cidr: str) -> bool:
    cidrs = (*config.cluster_cidrs, service_cidr)
    return any(ipaddress.ip_network(c, strict=False).version == 6 for c in cidrs)


def run_checks(
    config: ProxyConfig,
    service_cidr: str | None = None,
    conntrack: ConntrackLimits | None = None,
) -> list[Check]:
    """Every check, in the network namespace this process runs in. Raises ConfigError for a
    service CIDR that is not one."""
    cidr = service_cidr or DEFAULT_SERVICE_CIDR
    try:
        ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise ConfigError(f"--service-cidr {cidr!r} is not a CIDR ({exc})") from exc
    limits = conntrack or conntrack_limits(config)
    forward = "net.ipv4.ip_forward"
    checks = [
        _guarded(
            "iptables-backend",
            lambda: judge_backend(
                set(HINT_CHAINS) & read_all_legacy_chains(),
                {c for _, t, c in read_nft_chains() if t == "mangle" and c in HINT_CHAINS},
            ),
        ),
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
                read_all_legacy_chains(), read_nft_chains(), read_links(), read_proxy_processes()
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
