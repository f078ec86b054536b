"""What `kproxy doctor` reads from the node: the legacy tables (python-iptables), nftables,
links and routes (pyroute2), sysctls and processes (/proc). Nothing here writes anything: the
legacy tables are only opened when /proc says they already exist, since opening one creates it."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
class ProxyProcess:
    pid: int
    program: Literal["kube-proxy", "kproxy"]
    command: str


@dataclass(frozen=True)
class RouteLookup:
    address: str
    route: str | None  # "via 192.0.2.1 dev eth0", or None when there is none
    error: str = ""


def read_legacy_chains(table: str, family: int = 4) -> frozenset[str]:
    """Chain names of a legacy (x_tables) table; empty when this namespace has no such table."""
    names = PROC / "net" / ("ip_tables_names" if family == 4 else "ip6_tables_names")
    try:
        existing = names.read_text().split()
    except FileNotFoundError:  # no ip_tables module: no legacy table at all
        return frozenset()
    if table not in existing:
        return frozenset()
    from kproxy.dataplane.iptables.backend import load_iptc

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
