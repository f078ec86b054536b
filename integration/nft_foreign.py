"""Other programs' nf_tables objects on a node, for the nftables mode's tests.

- `foreign_tables` lists every table but kproxy's (on a test node: what real_node.py seeds,
  kubelet's and a CNI's iptables-nft chains in the `ip` and `ip6` families, where kproxy's
  `kube-proxy` tables live too, and a firewalld-like `inet` table), to compare before and after.
- Run as a module inside a namespace (`python -m integration.nft_foreign PLAN.pickle`, by
  test_nftables_foreign.py), it drives one nftables dataplane through syncs with other programs'
  commits in between; each step prints what the sync did as a JSON line: whether it read the
  kernel, what it wrote."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

from integration.netns import Namespace
from kproxy.dataplane.nftables.node import open_nftables_node

KPROXY_TABLES = ("ip kube-proxy", "ip6 kube-proxy")


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
