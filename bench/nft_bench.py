"""kproxy's nftables mode against upstream's iptables-legacy-restore, measured in one run.

    python -m bench.nft_bench --services 10000             # what `make bench` adds
    python -m bench.nft_bench --services 1000 5000 10000 20000

Each size runs in a fresh network namespace (`unshare -n`). For N ClusterIP services with E
endpoints each, kproxy runs as the agent does (SyncLoop, NftablesPlanner, the netlink dataplane)
in a process of its own, and the baseline (bench/sync_bench.py's) afterwards in another:

  (a) cold start from an empty ruleset vs `iptables-legacy-restore` of the equivalent table;
  (b) one service's endpoints changed vs upstream's `iptables-legacy-restore --noflush` of the
      top-level chains and that service's chains;
  (c) nothing changed (kproxy's whole sync: plan, diff, generation check);
  (d) where (a) goes: planning, and the kernel's commits (the encoding of each stage of a new
      table overlaps the commit of the one before, see kproxy/dataplane/nftables/staged.py),
      and its CPU seconds;
  (e) peak RSS of the kproxy process;
  (f) a restarted agent's first sync over the table the last one left (it reads it back).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time

from bench.sync_bench import (
    REPEATS,
    best,
    build_state,
    changed_ips,
    endpoint_ip,
    restore,
    run_in_netns,
    slice_for,
    timed,
)
from kproxy.gcpause import gc_paused
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName
from kproxy.plan.iptables.ruleset import plan_ruleset
from kproxy.rules.render import render_table


def prepare_baseline(services: int, endpoints: int) -> None:
    """The iptables table the baseline's partial restores start from (untimed): what the
    iptables mode would hold at this size."""
    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    state = build_state(services, endpoints)
    ruleset = plan_ruleset(
        state.services_map(), state.endpoints_map(), NodeInfo("n"), config
    ).ruleset
    restore("".join(render_table(t) for t in ruleset.tables), noflush=True)


def run_kproxy(services: int, endpoints: int) -> dict[str, float]:
    from kproxy.dataplane.nftables.netlink import NftNetlink
    from kproxy.dataplane.nftables.node import NftablesNode, delete_table
    from kproxy.health.healthz import ProxyHealth
    from kproxy.health.metrics import ProxyMetrics
    from kproxy.sync.loop import StateBox, SyncLoop
    from kproxy.sync.modes import MODES

    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    state = build_state(services, endpoints)
    health, metrics = ProxyHealth(timeout=60), ProxyMetrics()
    nl = NftNetlink()
    figures: dict[str, float] = {}

    def fresh_loop() -> SyncLoop:
        box = StateBox("bench-node", health, metrics)
        box.state = state
        node = NftablesNode(nl, (4,))
        return SyncLoop(box, config, MODES["nftables"], node, metrics, health)

    loop = fresh_loop()
    snapshot = loop.take_snapshot()
    started = time.perf_counter()
    with gc_paused():  # as SyncLoop.sync plans
        loop.plan(snapshot)
    figures["plan"] = time.perf_counter() - started
    del loop, snapshot  # its planner's cache holds a whole table: not part of the peak below

    def kproxy_full() -> float:
        gc.collect()  # the previous round's loop, so that one agent's worth is measured
        delete_table(nl, 4)
        state.restore_changes({NamespacedName("bench", f"svc-{i}") for i in range(services)})
        nl.kernel_seconds = 0.0
        cpu = time.process_time()
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        took = timed(fresh_loop().sync)
        if took < figures.get("full_kproxy", float("inf")):  # the figures of the best round
            figures["full_kproxy"] = took
            figures["full_cpu"] = time.process_time() - cpu
            figures["full_sys"] = resource.getrusage(resource.RUSAGE_SELF).ru_stime - system
            figures["full_commit"] = nl.kernel_seconds
        return took

    figures["full_kproxy"] = best(kproxy_full)
    loop = fresh_loop()
    gc.collect()
    started = time.perf_counter()
    assert loop.sync()
    figures["restart_kproxy"] = time.perf_counter() - started
    times = []
    for round_ in range(REPEATS):
        state.set_slice(slice_for(services // 2, changed_ips(services, endpoints, round_)))
        nl.kernel_seconds = 0.0
        times.append(timed(loop.sync))
        figures["change_commit"] = nl.kernel_seconds
    figures["change_kproxy"] = min(times)
    figures["nochange_kproxy"] = best(lambda: timed(loop.sync))
    figures["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state.set_slice(
        slice_for(services // 2, [endpoint_ip(services // 2, j) for j in range(endpoints)])
    )
    assert loop.sync()
    delete_table(nl, 4)
    return figures


def measure(services: int, endpoints: int) -> dict[str, float]:
    mine = f"{sys.executable} -m bench.nft_bench --services {services} --endpoints {endpoints}"
    base = f"{sys.executable} -m bench.sync_bench --services {services} --endpoints {endpoints}"
    return run_in_netns(
        services, f"{mine} --inner kproxy && {mine} --inner prepare && {base} --inner baseline"
    )


def report(services: int, endpoints: int, f: dict[str, float]) -> None:
    print(f"\n== nftables mode, {services} services x {endpoints} endpoints")
    rows = [
        ("(a) cold start", f["full_kproxy"], f["full_baseline"], "restore"),
        ("(b) one service changed", f["change_kproxy"], f["change_baseline"], "restore --noflush"),
    ]
    for name, mine, base, what in rows:
        print(f"{name:26} kproxy {mine:7.3f}s   {what} {base:7.3f}s   ratio {mine / base:5.3f}")
    print(f"{'(c) nothing changed':26} kproxy {f['nochange_kproxy'] * 1000:7.1f} ms")
    print(
        f"{'(d) cold start is':26} plan {f['plan']:.3f}s, kernel commits {f['full_commit']:.3f}s"
        f" (encoding overlaps them); a change commits in {f['change_commit'] * 1000:.1f} ms;"
        f" the cold start's CPU seconds (every thread, the kernel's work in them included)"
        f" {f['full_cpu']:.3f}s, of which the kernel's (system) {f['full_sys']:.3f}s"
    )
    print(f"{'(e) peak RSS':26} {f['rss_mb']:7.1f} MB")
    print(
        f"{'(f) restart':26} kproxy {f['restart_kproxy']:7.3f}s   (a new agent's first sync over"
        " the table it left: read back chain by chain and compared)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[10000])
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--inner", choices=("kproxy", "prepare"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner == "prepare":
        prepare_baseline(args.services[0], args.endpoints)
        return
    if args.inner:
        print(json.dumps(run_kproxy(args.services[0], args.endpoints)))
        return
    results = {n: measure(n, args.endpoints) for n in args.services}
    for n, f in results.items():
        report(n, args.endpoints, f)
    print("\nservices   cold: kproxy/restore    change: kproxy/noflush    nochange ms  RSS MB")
    for n, f in results.items():
        cold, change = (
            f["full_kproxy"] / f["full_baseline"],
            f["change_kproxy"] / f["change_baseline"],
        )
        print(
            f"{n:8}   {f['full_kproxy']:6.3f}/{f['full_baseline']:<6.3f} {cold:5.2f}x"
            f"   {f['change_kproxy']:6.3f}/{f['change_baseline']:<6.3f} {change:5.3f}x"
            f"   {f['nochange_kproxy'] * 1000:8.1f}  {f['rss_mb']:6.1f}"
        )


if __name__ == "__main__":
    main()
