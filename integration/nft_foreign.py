"""Other programs' nf_tables objects on a node, for the nftables mode's tests.

- `add_node_chains` puts what a real node holds beside kproxy's tables: kubelet's and a CNI's chains
  written by iptables-nft and ip6tables-nft (in the `ip` and `ip6` families, where kproxy's
  `kube-proxy` tables live too) and a firewalld-like `inet` table with a base chain;
  `foreign_tables` lists every table but kproxy's, to compare before and after.
- Run as a module inside a namespace (`python -m integration.nft_foreign PLAN.pickle`, by
  test_nftables_foreign.py), it drives one nftables dataplane through syncs with other programs'
  commits in between; each step prints what the sync did as a JSON line: whether it read the
  kernel, what it wrote."""

from __future__ import annotations

import json
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

from integration.netns import Namespace
from kproxy.dataplane.nftables.node import open_nftables_node

KPROXY_TABLES = ("ip kube-proxy", "ip6 kube-proxy")

# As kubelet (KUBE-FIREWALL and its jumps, the canary and hint chains) and a CNI (hostport DNAT,
# Calico's forward chain) write them through iptables-nft.
_KUBELET = (
    "-N KUBE-FIREWALL",
    "-A KUBE-FIREWALL -m comment --comment 'block incoming localnet connections'",
    "-A KUBE-FIREWALL -m conntrack --ctstate INVALID -j DROP",
    "-I INPUT -j KUBE-FIREWALL",
    "-I OUTPUT -j KUBE-FIREWALL",
    "-t mangle -N KUBE-KUBELET-CANARY",
    "-t mangle -N KUBE-IPTABLES-HINT",
    "-t nat -N CNI-HOSTPORT-DNAT",
    "-t nat -A CNI-HOSTPORT-DNAT -p tcp --dport 8443 -j RETURN",
    "-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
    "-t nat -A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
    "-N cali-FORWARD",
    "-A cali-FORWARD -m mark --mark 0x10000/0x10000 -j ACCEPT",
    "-A FORWARD -j cali-FORWARD",
)
_FIREWALLD = (
    "add table inet firewalld",
    "add chain inet firewalld filter_INPUT { type filter hook input priority 10; policy accept; }",
    "add rule inet firewalld filter_INPUT ct state established,related accept",
)


IPTABLES_NFT = {"ip": "iptables-nft", "ip6": "ip6tables-nft"}


def add_node_chains(ns: Namespace, families: tuple[str, ...] = ("ip", "ip6")) -> None:
    """Other programs' chains and rules: kubelet's and a CNI's through iptables-nft in `families`
    (`ip`, `ip6`), and a firewall's `inet` table, as on a node."""
    for tool in (IPTABLES_NFT[family] for family in families):
        for args in _KUBELET:
            ns.run(tool, "-w", *shlex.split(args))
    for command in _FIREWALLD:
        ns.run("nft", command)


def foreign_tables(ns: Namespace) -> dict[str, str]:
    """Every table but kproxy's, as `nft -a -s list table` prints it (with handles, which change
    when an object is deleted and added again; without counters, which packets change)."""
    out = {}
    for line in ns.run("nft", "list", "tables").stdout.splitlines():
        name = line.removeprefix("table ").strip()
        if name not in KPROXY_TABLES:
            out[name] = ns.run("nft", "-a", "-s", "list", "table", *name.split()).stdout
    return out


# Between syncs: nothing, a commit to another table, then changes to kproxy's own table.
STEPS = (
    ("first", ()),
    ("quiet", ()),
    ("other table", ("add table inet firewall", "add chain inet firewall input")),
    ("kproxy's table", ("insert rule ip kube-proxy services drop",)),
    ("after the repair", ()),
)


def main(path: str) -> None:
    plan = pickle.loads(Path(path).read_bytes())
    with open_nftables_node(plan.families) as node:
        for name, commands in STEPS:
            for command in commands:
                subprocess.run(["nft", *command.split()], check=True)
            result = node.apply(plan, full=False)
            table = result.tables[0]
            print(json.dumps({"step": name, "read": table.read_kernel, "wrote": table.write}))


if __name__ == "__main__":
    main(sys.argv[1])
