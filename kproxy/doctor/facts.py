"""What `kproxy doctor` looks for on the node: the chains and interfaces other proxies leave, and
the proxy processes of this network namespace (/proc). The kernel reads themselves (tables, links,
routes) are the dataplane's, in kproxy/dataplane/readers.py."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kproxy.dataplane.readers import read_legacy_chains

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
PROC = Path("/proc")


@dataclass(frozen=True)
class ProxyProcess:
    pid: int
    program: Literal["kube-proxy", "kproxy"]
    command: str


def read_all_legacy_chains() -> frozenset[str]:
    """Chain names of every legacy table kube-proxy or kubelet writes, both families."""
    return frozenset().union(*(read_legacy_chains(t, f) for t in LEGACY_TABLES for f in (4, 6)))


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
