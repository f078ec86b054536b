"""Write a pickled node plan's tables with the nftables dataplane (run inside a namespace by the
oracle test: `python -m integration.nft_write PLAN.pickle`)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from kproxy.dataplane.nftables.netlink import NftNetlink
from kproxy.dataplane.nftables.node import NftablesNode


def main(path: str) -> None:
    plan = pickle.loads(Path(path).read_bytes())
    with NftNetlink() as nl:
        NftablesNode(nl, plan.families).apply(plan, full=True)


if __name__ == "__main__":
    main(sys.argv[1])
