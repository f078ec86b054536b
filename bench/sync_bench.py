"""kproxy's sync against upstream kube-proxy's iptables-legacy-restore, measured in one run.

    python -m bench.sync_bench --services 10000            # one size (what `make bench` runs)
    python -m bench.sync_bench --services 1000 5000 10000 20000
    python -m bench.sync_bench --services 1000 --endpoints 100

Each size runs in a fresh network namespace (`unshare -n`), so the host's tables are never
touched. For N ClusterIP services with E endpoints each it times:

  (a) full sync from empty tables: kproxy's agent sync vs iptables-legacy-restore of the same
      ruleset upstream writes at that size (large-cluster mode included);
  (b) one service's endpoints changed: kproxy's partial sync vs upstream's partial restore
      (`--noflush`, the top-level chains plus that service's chains, `-X` for the stale one);
  (c) nothing changed: kproxy's sync vs upstream's partial restore of the top-level chains;
  (d) planning alone (plan_ruleset for the whole cluster);
  (e) peak RSS of the kproxy process (kproxy runs in a process of its own; the baseline's
      work happens in another, in the same namespace, after it). That process also runs (d)
      and builds a new SyncLoop for each full sync and for (b), on the same dataplane: each new
      loop's planner makes every rule anew while the dataplane still keeps the tables the last
      loop wrote, so it holds two plans at once, which an agent (one SyncLoop) never does;
  (e') peak RSS of an agent's own sequence, in a process of its own and a namespace of its
      own: one SyncLoop, its full sync from empty tables and the collection the agent runs
      after a full sync (freeze_heap), then the (b) changes as partial syncs.

It prints each figure, the ratio kproxy/baseline, and a table across sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from kproxy.dataplane.xtables.kernel_image import ImageMatch, TableImage, read_image
from kproxy.gcpause import gc_paused
from kproxy.model.config import ProxyConfig
from kproxy.model.convert import EndpointSliceInfo, EndpointSlicePort
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.iptables import naming
from kproxy.plan.iptables.ruleset import plan_ruleset
from kproxy.rules.ir import Ruleset
from kproxy.rules.render import render_rule, render_table
from kproxy.state.cluster import ClusterState

TOP_LEVEL = {
    "filter": (
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ),
    "nat": ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"),
}
REPEATS = 2


def service_ip(i: int) -> str:
    return f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"


def endpoint_ip(i: int, j: int) -> str:
    return f"10.{128 + j % 64}.{i // 256 % 256}.{i % 256}"


def build_state(services: int, endpoints: int) -> ClusterState:
    state = ClusterState()
    for i in range(services):
        key = NamespacedName("bench", f"svc-{i}")
        spn = ServicePortName(key, "http", Protocol.TCP)
        state.set_service(key, [ServicePort(spn, (service_ip(i),), 80)])
        state.set_slice(slice_for(i, [endpoint_ip(i, j) for j in range(endpoints)]))
    return state


def slice_for(i: int, ips: list[str]) -> EndpointSliceInfo:
    key = NamespacedName("bench", f"svc-{i}")
    return EndpointSliceInfo(
        key=NamespacedName("bench", f"svc-{i}-abcde"),
        service=key,
        address_type="IPv4",
        ports=(EndpointSlicePort("http", 8080, Protocol.TCP),),
        endpoints=tuple(Endpoint(ip, 0, node_name="other") for ip in ips),
    )


def restore(text: str, noflush: bool) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".rules") as f:
        f.write(text)
        f.flush()
        args = ["iptables-legacy-restore", "-w", "5"] + (["--noflush"] if noflush else [])
        started = time.perf_counter()
        with open(f.name) as stdin:
            subprocess.run(args, stdin=stdin, check=True)
        return time.perf_counter() - started


def flush_tables() -> None:
    for table in ("filter", "nat", "mangle"):
        subprocess.run(["iptables-legacy", "-w", "-t", table, "-F"], check=True)
        subprocess.run(["iptables-legacy", "-w", "-t", table, "-X"], check=True)


def partial_restore_text(ruleset: Ruleset, chains: set[str], deleted: set[str]) -> str:
    """What upstream's partial sync feeds iptables-restore --noflush: the top-level chains and
    the changed services' chains in full, then `-X` for chains gone."""
    out = []
    for table in ruleset.tables:
        if table.name not in TOP_LEVEL:
            continue
        wanted = set(TOP_LEVEL[table.name]) | (chains if table.name == "nat" else set())
        out.append(f"*{table.name}")
        picked = [c for c in table.chains if c.name in wanted]
        out.extend(f":{c.name} - [0:0]" for c in picked)
        out.extend(f":{name} - [0:0]" for name in sorted(deleted) if table.name == "nat")
        for c in picked:
            out.extend(render_rule(c.name, r) for r in c.rules)
        out.extend(f"-X {name}" for name in sorted(deleted) if table.name == "nat")
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def best(fn: Callable[[], float], repeats: int = REPEATS) -> float:
    return min(fn() for _ in range(repeats))


def changed_ips(services: int, endpoints: int, round_: int) -> list[str]:
    """The endpoints of the changed service in round `round_`: one endpoint replaced."""
    ips = [endpoint_ip(services // 2, j) for j in range(endpoints)]
    ips[0] = f"10.255.{round_}.{round_ + 1}"
    return ips


def run_kproxy(services: int, endpoints: int) -> dict[str, float]:
    """kproxy's figures, in a process that does nothing else, so its peak RSS is kproxy's."""
    from kproxy.dataplane.iptables.node import IptablesNode
    from kproxy.dataplane.xtables.backend import IptablesDataplane
    from kproxy.health.healthz import ProxyHealth
    from kproxy.health.metrics import ProxyMetrics
    from kproxy.sync.loop import StateBox, SyncLoop
    from kproxy.sync.modes import MODES

    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    state = build_state(services, endpoints)
    health, metrics = ProxyHealth(timeout=60), ProxyMetrics()
    dataplane = IptablesDataplane(4, lock_timeout=30)
    figures: dict[str, float] = {}

    def fresh_loop() -> SyncLoop:
        box = StateBox("bench-node", health, metrics)
        box.state = state
        node = IptablesNode({4: dataplane}, write_sysctls=lambda sysctls: None)
        return SyncLoop(box, config, MODES["iptables"], node, metrics, health)

    # (d) planning alone, with cold caches, as the agent's first sync plans.
    loop = fresh_loop()
    snapshot = loop.take_snapshot()
    started = time.perf_counter()
    with gc_paused():
        loop.plan(snapshot)
    figures["plan"] = time.perf_counter() - started
    # Its planner's cache holds a whole plan the agent never has beside its own: let it go
    # before the syncs, so that (e) is the agent's peak, not this one's plus a second plan.
    del loop, snapshot

    def kproxy_full() -> float:
        flush_tables()
        state.restore_changes({NamespacedName("bench", f"svc-{i}") for i in range(services)})
        return timed(fresh_loop().sync)

    figures["full_kproxy"] = best(kproxy_full)
    # (b) one service's endpoints change, with the agent warm (as after its first sync).
    loop = fresh_loop()
    assert loop.sync()
    times, cpu = [], []
    for round_ in range(REPEATS):
        time.sleep(1)  # as minSyncPeriod would: the last commit's table copy is refreshed
        state.set_slice(slice_for(services // 2, changed_ips(services, endpoints, round_)))
        started = time.process_time()
        times.append(timed(loop.sync))
        cpu.append(time.process_time() - started)
    figures["change_kproxy"] = min(times)
    # The process's CPU seconds in that sync (all its threads, kernel time included).
    figures["change_kproxy_cpu"] = min(cpu)
    # What the proof before each commit costs: the kernel's entries of nat, compared with the
    # kept digest (table_writer.py explains why a partial write needs it).
    kept = ImageMatch(_image("nat"))
    figures["verify_kproxy"] = best(lambda: timed(lambda: kept.matches(_image("nat"))))
    # (c) nothing changed.
    time.sleep(1)
    figures["nochange_kproxy"] = best(lambda: timed(loop.sync))
    figures["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Leave the original version in the kernel for the baseline process.
    state.set_slice(
        slice_for(services // 2, [endpoint_ip(services // 2, j) for j in range(endpoints)])
    )
    assert loop.sync()
    return figures


def run_agent(services: int, endpoints: int) -> dict[str, float]:
    """(e'): what `kproxy run` holds at its peak, in a process that does nothing else."""
    from kproxy.dataplane.iptables.node import IptablesNode
    from kproxy.dataplane.xtables.backend import IptablesDataplane
    from kproxy.health.healthz import ProxyHealth
    from kproxy.health.metrics import ProxyMetrics
    from kproxy.sync.loop import StateBox, SyncLoop, freeze_heap
    from kproxy.sync.modes import MODES

    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    health, metrics = ProxyHealth(timeout=60), ProxyMetrics()
    box = StateBox("bench-node", health, metrics)
    box.state = build_state(services, endpoints)
    node = IptablesNode({4: IptablesDataplane(4, lock_timeout=30)}, write_sysctls=lambda s: None)
    loop = SyncLoop(box, config, MODES["iptables"], node, metrics, health)
    assert loop.sync()
    freeze_heap()  # as SyncLoop.run does after a full sync
    for round_ in range(REPEATS):
        time.sleep(1)  # as minSyncPeriod would
        box.state.set_slice(slice_for(services // 2, changed_ips(services, endpoints, round_)))
        assert loop.sync()
    return {"agent_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _image(table: str) -> TableImage:
    image = read_image(4, table)
    assert image is not None
    return image


def run_baseline(services: int, endpoints: int) -> dict[str, float]:
    """Upstream's iptables-legacy-restore of the same rules, in the same namespace."""
    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    node = NodeInfo(name="bench-node")
    state = build_state(services, endpoints)
    ruleset = plan_ruleset(state.services_map(), state.endpoints_map(), node, config).ruleset
    figures: dict[str, float] = {
        "rules": sum(len(c.rules) for t in ruleset.tables for c in t.chains)
    }
    spn = ServicePortName(NamespacedName("bench", f"svc-{services // 2}"), "http", Protocol.TCP)
    old = {naming.endpoint_chain(spn, ep) for ep in state.endpoints_map()[spn]}
    times = []
    for round_ in range(REPEATS):
        state.set_slice(slice_for(services // 2, changed_ips(services, endpoints, round_)))
        changed = plan_ruleset(state.services_map(), state.endpoints_map(), node, config).ruleset
        new = {naming.endpoint_chain(spn, ep) for ep in state.endpoints_map()[spn]}
        chains = {naming.service_chain(spn)} | new
        times.append(restore(partial_restore_text(changed, chains, old - new), True))
        # Back to the original version, untimed.
        restore(partial_restore_text(ruleset, {naming.service_chain(spn)} | old, new - old), True)
    figures["change_baseline"] = min(times)
    figures["nochange_baseline"] = best(
        lambda: restore(partial_restore_text(ruleset, set(), set()), True)
    )
    text = "".join(render_table(t) for t in ruleset.tables)

    def baseline_full() -> float:
        flush_tables()
        return restore(text, noflush=True)

    figures["full_baseline"] = best(baseline_full)
    return figures


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn` took."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(services: int, endpoints: int) -> dict[str, float]:
    """Run one size in a fresh network namespace: kproxy's process, then the baseline's, one
    after the other in the same namespace; returns their figures."""
    inner = f"{sys.executable} -m bench.sync_bench --services {services} --endpoints {endpoints}"
    figures = run_in_netns(services, f"{inner} --inner agent")
    figures.update(run_in_netns(services, f"{inner} --inner kproxy && {inner} --inner baseline"))
    return figures


def run_in_netns(services: int, script: str) -> dict[str, float]:
    """`script` (shell) under `unshare -n`; the figures its steps printed as JSON lines. The
    xtables lock is a file of its own: /run/xtables.lock is shared by every namespace, and any
    program on the host holding it would stall the syncs measured here (30 s lock timeouts)."""
    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmp:
        env = {**os.environ, "XTABLES_LOCKFILE": os.path.join(tmp, "xtables.lock")}
        proc = subprocess.run(
            ["unshare", "-n", "sh", "-c", script],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark at {services} services failed:\n{proc.stderr[-3000:]}")
    figures: dict[str, float] = {}
    for line in proc.stdout.strip().splitlines():
        if line.startswith("{"):
            figures.update(json.loads(line))
    return figures


def report(services: int, endpoints: int, f: dict[str, float]) -> None:
    print(f"\n== {services} services x {endpoints} endpoints ({int(f['rules'])} rules)")
    rows = [
        ("(a) full sync from empty", f["full_kproxy"], f["full_baseline"], "restore"),
        ("(b) one service changed", f["change_kproxy"], f["change_baseline"], "partial restore"),
        ("(c) nothing changed", f["nochange_kproxy"], f["nochange_baseline"], "partial restore"),
    ]
    for name, mine, base, what in rows:
        print(f"{name:28} kproxy {mine:7.3f}s   {what} {base:7.3f}s   ratio {mine / base:5.2f}")
    if "change_kproxy_cpu" in f:
        print(f"{'    CPU of that sync':28} kproxy {f['change_kproxy_cpu']:7.3f}s")
    verify = f["verify_kproxy"]
    print(f"{'    of which kernel read':28} kproxy {verify:7.3f}s   (the entries of nat, compared)")
    print(f"{'(d) planning alone':28} {f['plan']:7.3f}s")
    print(f"{'(e) peak RSS':28} {f['rss_mb']:7.1f} MB")
    agent = "(e') peak RSS, agent sequence"
    print(f"{agent:28} {f['agent_rss_mb']:7.1f} MB")


def _pair(f: dict[str, float], name: str) -> str:
    mine, base = f[f"{name}_kproxy"], f[f"{name}_baseline"]
    return f"{mine:6.3f}/{base:<6.3f} {mine / base:5.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[10000])
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--inner", choices=("kproxy", "agent", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        run = {"kproxy": run_kproxy, "agent": run_agent, "baseline": run_baseline}[args.inner]
        print(json.dumps(run(args.services[0], args.endpoints)))
        return
    results = {}
    for n in args.services:
        results[n] = measure(n, args.endpoints)
        report(n, args.endpoints, results[n])
    print(
        "\nservices   full: kproxy/restore      change: kproxy/partial   nochange   plan  RSS MB"
        "  agent MB"
    )
    for n, f in results.items():
        print(
            f"{n:8}   {_pair(f, 'full')}   {_pair(f, 'change')}"
            f"   {f['nochange_kproxy'] / f['nochange_baseline']:5.2f}x"
            f"  {f['plan']:5.2f}  {f['rss_mb']:6.1f}  {f['agent_rss_mb']:8.1f}"
        )
    if len(results) > 1:
        first, last = min(results), max(results)
        growth = results[last]["full_kproxy"] / results[first]["full_kproxy"]
        print(f"full-sync growth {first} -> {last} services: {growth:.1f}x for {last / first:.0f}x")


if __name__ == "__main__":
    main()
