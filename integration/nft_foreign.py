"""Drive one nftables dataplane through syncs with other programs' commits in between (run
inside a namespace by test_nftables_foreign.py: `python -m integration.nft_foreign PLAN.pickle`).
Each step prints what the sync did as a JSON line: whether it read the kernel, what it wrote."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

from kproxy.dataplane.nftables.node import open_nftables_node

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
