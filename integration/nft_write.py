"""Write a pickled node plan's tables with the nftables dataplane, inside a namespace (run by the
oracle and staging tests: `python -m integration.nft_write PLAN.pickle [STAGE_MESSAGES]`). It
prints how many transactions the write took; a refused write exits 3 with the error."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

from kproxy.dataplane.nftables import staged
from kproxy.dataplane.nftables.kernel import read_generation
from kproxy.dataplane.nftables.netlink import NftNetlink
from kproxy.dataplane.nftables.node import NftablesNode
from kproxy.errors import DataplaneError


def main(path: str, stage_messages: str | None = None) -> None:
    if stage_messages is not None:
        staged.STAGE_MESSAGES = int(stage_messages)
    plan = pickle.loads(Path(path).read_bytes())
    with NftNetlink() as nl:
        before = read_generation(nl)
        try:
            NftablesNode(nl, plan.families).apply(plan, full=True)
        except DataplaneError as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(3) from None
        print(json.dumps({"transactions": read_generation(nl) - before}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
