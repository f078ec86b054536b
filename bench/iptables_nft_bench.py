"""The iptables mode's nft backend against iptables-nft-restore of the same rules, with the legacy
backend beside them, measured in one run.

    python -m bench.iptables_nft_bench                    # 10,000 services x 5 endpoints
    python -m bench.iptables_nft_bench --services 1000    # smaller, while developing

Everything runs in a fresh network namespace (`unshare -n`); each side in a process of its own,
one after the other, so each peak RSS is that side's. For N ClusterIP services it times:

  (a) full sync from empty tables: kproxy's nft backend vs `iptables-nft-restore` of the whole
      ruleset (the restore's own peak RSS is measured as a child's);
  (b) one service's endpoints changed: the nft backend's partial sync (warm agent) vs a
      `--noflush` restore of that service's chains (and the top-level chains, `-X` for the
      stale endpoint chain), as upstream writes a partial sync;
  (c) nothing changed: the nft backend's sync (target: <= 5 ms);
  (d) the legacy backend (libiptc) doing (a), (b) and (c) in the same namespace;
  (e) the netlink road's floor: one rule added over netlink with pyroute2 (no expression
      encoding), against one rule through iptables-nft-restore.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from bench.sync_bench import (
    REPEATS,
    best,
    build_state,
    changed_ips,
    partial_restore_text,
    run_in_netns,
    slice_for,
    timed,
)
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePortName
from kproxy.plan.iptables import naming
from kproxy.plan.iptables.ruleset import build_ruleset
from kproxy.rules.render import render_table

CONFIG = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))


def nft_restore(text: str) -> float:
    started = time.perf_counter()
    subprocess.run(["iptables-nft-restore", "--noflush"], input=text, text=True, check=True)
    return time.perf_counter() - started


def flush_nft() -> None:
    subprocess.run(["nft", "flush", "ruleset"], check=True)


def run_nft(services: int, endpoints: int) -> dict[str, float]:
    """kproxy's nft backend, through the sync loop as the agent runs it."""
    from kproxy.dataplane.iptables.node import IptablesNode
    from kproxy.dataplane.xtables.nft_backend import NftDataplane
    from kproxy.health.healthz import ProxyHealth
    from kproxy.health.metrics import ProxyMetrics
    from kproxy.plan.iptables.planner import IptablesPlanner
    from kproxy.sync.loop import StateBox, SyncLoop

    state = build_state(services, endpoints)
    health, metrics = ProxyHealth(timeout=60), ProxyMetrics()

    def fresh_loop() -> SyncLoop:
        box = StateBox("bench-node", health, metrics)
        box.state = state
        node = IptablesNode({4: NftDataplane(4)}, write_sysctls=lambda sysctls: None)
        return SyncLoop(box, CONFIG, IptablesPlanner(CONFIG), node, metrics, health)

    def full() -> float:
        flush_nft()
        state.restore_changes({NamespacedName("bench", f"svc-{i}") for i in range(services)})
        return timed(fresh_loop().sync)

    figures = {"full_nft": best(full)}
    loop = fresh_loop()
    assert loop.sync()
    times = []
    for round_ in range(REPEATS):
        state.set_slice(slice_for(services // 2, changed_ips(services, endpoints, round_)))
        times.append(timed(loop.sync))
    figures["change_nft"] = min(times)
    figures["nochange_nft"] = best(lambda: timed(loop.sync), repeats=5)
    figures["rss_nft"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flush_nft()
    return figures


def run_restore(services: int, endpoints: int) -> dict[str, float]:
    """iptables-nft-restore of the same rules: whole, then one service's chains (--noflush)."""
    node = NodeInfo(name="bench-node")
    state = build_state(services, endpoints)
    ruleset = build_ruleset(state.services_map(), state.endpoints_map(), node, CONFIG)
    text = "".join(render_table(t) for t in ruleset.tables)
    figures: dict[str, float] = {
        "rules": sum(len(c.rules) for t in ruleset.tables for c in t.chains)
    }

    def whole() -> float:
        flush_nft()
        return nft_restore(text)

    figures["full_restore"] = best(whole)
    spn = ServicePortName(NamespacedName("bench", f"svc-{services // 2}"), "http", Protocol.TCP)
    old = {naming.endpoint_chain(spn, ep) for ep in state.endpoints_map()[spn]}
    times = []
    for round_ in range(REPEATS):
        state.set_slice(slice_for(services // 2, changed_ips(services, endpoints, round_)))
        changed = build_ruleset(state.services_map(), state.endpoints_map(), node, CONFIG)
        new = {naming.endpoint_chain(spn, ep) for ep in state.endpoints_map()[spn]}
        chains = {naming.service_chain(spn)} | new
        times.append(nft_restore(partial_restore_text(changed, chains, old - new)))
        nft_restore(partial_restore_text(ruleset, {naming.service_chain(spn)} | old, new - old))
    figures["change_restore"] = min(times)
    figures["rss_restore"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    figures["one_rule_restore"] = best(
        lambda: nft_restore("*nat\n-A KUBE-MARK-MASQ -j RETURN\nCOMMIT\n"), repeats=5
    )
    figures["one_rule_netlink"] = netlink_one_rule()
    flush_nft()
    return figures


def netlink_one_rule() -> float:
    """The netlink road's floor: one NFT_MSG_NEWRULE batch through pyroute2 (an address match
    and a verdict; encoding comments, statistic and DNAT would come on top)."""
    from pyroute2.nftables.expressions import ipv4addr, verdict
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=2)
    try:

        def one() -> float:
            started = time.perf_counter()
            rule = (ipv4addr(src="10.0.0.0/24"), verdict(code=1))  # `-s 10.0.0.0/24 -j ACCEPT`
            nft.rule("add", table="nat", chain="KUBE-MARK-MASQ", expressions=rule)
            return time.perf_counter() - started

        return best(one, repeats=5)
    except Exception:  # pyroute2's rule API differs between versions: no figure then
        return float("nan")
    finally:
        nft.close()


def run_legacy(services: int, endpoints: int) -> dict[str, float]:
    from bench.sync_bench import run_kproxy

    figures = run_kproxy(services, endpoints)
    return {
        "full_legacy": figures["full_kproxy"],
        "change_legacy": figures["change_kproxy"],
        "nochange_legacy": figures["nochange_kproxy"],
        "rss_legacy": figures["rss_mb"],
    }


RUNS = {"nft": run_nft, "restore": run_restore, "legacy": run_legacy}


def report(services: int, endpoints: int, f: dict[str, float]) -> None:
    print(f"\n== {services} services x {endpoints} endpoints ({int(f['rules'])} rules)")
    print(f"{'':30}{'nft backend':>12}{'nft-restore':>13}{'ratio':>8}{'legacy':>10}")
    rows = [
        ("(a) full sync from empty", "full_nft", "full_restore", "full_legacy"),
        ("(b) one service changed", "change_nft", "change_restore", "change_legacy"),
        ("(c) nothing changed", "nochange_nft", None, "nochange_legacy"),
    ]
    for name, mine, base, legacy in rows:
        ratio = f"{f[mine] / f[base]:7.2f}x" if base else f"{'':8}"
        baseline = f"{f[base]:12.4f}s" if base else f"{'':13}"
        print(f"{name:30}{f[mine]:11.4f}s{baseline}{ratio}{f[legacy]:9.4f}s")
    print(
        f"{'(d) peak RSS (MB)':30}{f['rss_nft']:12.1f}{f['rss_restore']:13.1f}"
        f"{f['rss_nft'] / f['rss_restore']:7.2f}x{f['rss_legacy']:10.1f}"
    )
    print(
        f"{'(e) one rule: restore/netlink':30}{f['one_rule_restore'] * 1000:11.2f}ms"
        f"{f['one_rule_netlink'] * 1000:12.2f}ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--inner", choices=tuple(RUNS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(RUNS[args.inner](args.services, args.endpoints)))
        return
    inner = f"{sys.executable} -m bench.iptables_nft_bench --services {args.services}"
    inner += f" --endpoints {args.endpoints} --inner"
    script = " && ".join(f"{inner} {name}" for name in RUNS)
    report(args.services, args.endpoints, run_in_netns(args.services, script))


if __name__ == "__main__":
    main()
