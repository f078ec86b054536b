"""What the kernel charges for a tiny nftables commit into a big table, whatever writes it.

    python -m bench.nft_commit_floor --services 2000 10000

In a fresh network namespace per size, kproxy's table for N services x 5 endpoints is loaded,
then one-chain transactions are timed in the kernel (send to ack, the median of 7), each undone
afterwards:

  (a) a new empty chain;
  (b) a chain and a rule that only compares (no expression with a validate hook);
  (c) the same rule ending in `accept`;
  (d) the same rule ending in `goto` an endpoint chain.

A rule with a verdict, a DNAT or a masquerade makes nf_tables validate the whole table at commit
(every chain reachable from the base chains), so (c) and (d) cost what (b) does plus that walk.
Every change kproxy makes to a service adds such rules (its endpoint chains DNAT and jump to
mark-for-masquerade, its service chain jumps to them), so (d) is the floor of a one-service change.
The ratio printed is (d) against (b) at the same size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable

from bench.sync_bench import build_state, run_in_netns
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo

ROUNDS = 7


def measure_inner(services: int) -> dict[str, float]:
    from kproxy.dataplane.nftables import encode as e
    from kproxy.dataplane.nftables.delta import (
        NFT_MSG_DELCHAIN,
        NFT_MSG_DELRULE,
        NFT_MSG_NEWCHAIN,
        NFT_MSG_NEWRULE,
        Msg,
        delta_messages,
        full_delta,
    )
    from kproxy.dataplane.nftables.families import NFPROTO
    from kproxy.dataplane.nftables.netlink import NLM_F_APPEND, NLM_F_CREATE, NftNetlink
    from kproxy.plan.nftables.ir import Key, Match, Rule, Verdict
    from kproxy.plan.nftables.table import plan_nft_table

    state = build_state(services, 5)
    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    table = plan_nft_table(state.services_map(), state.endpoints_map(), NodeInfo("n"), config).table
    nl = NftNetlink()
    nl.transact(delta_messages(full_delta(table), iter(range(1, 1 << 30))))
    family = NFPROTO[4]
    endpoint = next(c.name for c in table.chains if c.name.startswith("endpoint-"))
    new_chain: Msg = (NFT_MSG_NEWCHAIN, NLM_F_CREATE, family, e.chain_name_attrs(table.name, "x"))
    undo: list[Msg] = [
        (NFT_MSG_DELRULE, 0, family, e.rule_chain_attrs(table.name, "x")),
        (NFT_MSG_DELCHAIN, 0, family, e.chain_name_attrs(table.name, "x")),
    ]

    def with_rule(*tail: Verdict) -> list[Msg]:
        rule = Rule((Match(Key.DADDR, "10.9.9.9"), *tail))
        attrs = e.rule_attrs(table.name, "x", rule, 4)
        return [new_chain, (NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, family, attrs)]

    def kernel_ms(messages: Iterable[Msg]) -> float:
        batch = list(messages)
        times = []
        for _ in range(ROUNDS):
            nl.transact(batch)
            times.append(nl.last_commit_seconds)
            nl.transact(undo)
        return statistics.median(times) * 1000

    return {
        "empty_chain": kernel_ms([new_chain]),
        "compare": kernel_ms(with_rule()),
        "accept": kernel_ms(with_rule(Verdict("accept"))),
        "goto": kernel_ms(with_rule(Verdict("goto", endpoint))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(measure_inner(args.services[0])))
        return
    print("services   empty chain   compare   +accept   +goto (ms, kernel)   goto/compare")
    for services in args.services:
        f = run_in_netns(
            services, f"{sys.executable} -m bench.nft_commit_floor --inner --services {services}"
        )
        print(
            f"{services:8}   {f['empty_chain']:11.2f}   {f['compare']:7.2f}   {f['accept']:7.2f}"
            f"   {f['goto']:7.2f}               {f['goto'] / f['compare']:6.1f}x"
        )


if __name__ == "__main__":
    main()
