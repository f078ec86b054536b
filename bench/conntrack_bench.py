"""Stale UDP flow cleanup on a busy node: 250,000 conntrack entries, one UDP service removed.

In a fresh network namespace (`unshare -n`), the agent's SyncLoop (iptables mode, the real
python-iptables backend and conntrack cleaner) syncs N TCP services and a few UDP ones. Measured
twice, in the same run: first with an empty conntrack table (the baseline), then with the table
loaded with real entries (`conntrack -R`): flows to the UDP service that is then removed, to the
other UDP services, TCP flows to the TCP services and foreign UDP flows.

- the sync that removes a UDP service, and the time from the removal until no flow to it is
  left (checked with a filtered dump of its address after the sync);
- the sync of a TCP service's endpoint change (no conntrack work at all);
- what the old cleanup would cost: pyroute2's dump of the whole table, per entry, timed on a
  sample and scaled to the table (it read every entry into Python, in the sync).

nf_conntrack_max is the kernel's (it is read-only inside a network namespace other than the
host's, and the host's is never changed): the table is filled to at most 98 % of it.

    python -m bench.conntrack_bench [--entries 250000] [--services 1000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.sync_bench import build_state, run_in_netns, service_ip, timed
from integration.conntrack_load import FlowGroup, flow_commands
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName

REPEATS = 3
# udp-0..2 are removed one by one with an empty table, udp-3..5 with the table loaded (each
# with REMOVED_FLOWS flows of its own); udp-6 and udp-7 stay.
UDP_SERVICES = 2 * REPEATS + 2
REMOVED_FLOWS = 14_000  # the kube-dns figure
PYROUTE2_SAMPLE = 3_000


def udp_vip(i: int) -> str:
    return f"10.97.0.{10 + i}"


def udp_endpoint(i: int) -> str:
    return f"10.250.{i}.5"


def add_udp_services(state: Any) -> None:
    from kproxy.model.convert import EndpointSliceInfo, EndpointSlicePort

    for i in range(UDP_SERVICES):
        key = NamespacedName("bench", f"udp-{i}")
        spn = ServicePortName(key, "dns", Protocol.UDP)
        state.set_service(key, [ServicePort(spn, (udp_vip(i),), 53)])
        state.set_slice(
            EndpointSliceInfo(
                key=NamespacedName("bench", f"udp-{i}-abcde"),
                service=key,
                address_type="IPv4",
                ports=(EndpointSlicePort("dns", 53, Protocol.UDP),),
                endpoints=(Endpoint(udp_endpoint(i), 0, node_name="other"),),
            )
        )


def table_groups(entries: int, services: int) -> list[FlowGroup]:
    """`entries` flows: the removed service's, the other UDP services', TCP and foreign ones."""
    removed = [
        FlowGroup("udp", udp_vip(i), 53, udp_endpoint(i), REMOVED_FLOWS)
        for i in range(REPEATS, 2 * REPEATS)
    ]
    others = [
        FlowGroup("udp", udp_vip(i), 53, udp_endpoint(i), 12_000)
        for i in range(2 * REPEATS, UDP_SERVICES)
    ]
    foreign = FlowGroup("udp", "198.51.100.7", 53, "198.51.100.7", entries // 5)
    fixed = sum(g.count for g in (*removed, *others, foreign))
    tcp_total = max(0, entries - fixed)
    tcp = [
        FlowGroup("tcp", service_ip(i), 80, f"10.200.{i % 250}.{i // 250 + 1}", 0)
        for i in range(min(services, 100))
    ]
    per = tcp_total // len(tcp)
    tcp = [FlowGroup(g.proto, g.dst, g.dport, g.reply_src, per) for g in tcp]
    tcp[0] = FlowGroup("tcp", tcp[0].dst, 80, tcp[0].reply_src, per + tcp_total - per * len(tcp))
    return [*removed, *others, foreign, *tcp]


def load_table(groups: list[FlowGroup]) -> float:
    """Fill this namespace's table with two `conntrack -R` processes (two cores); seconds."""
    lines: list[str] = []
    for group in groups:
        lines += flow_commands(group, len(lines))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        halves = [lines[: len(lines) // 2], lines[len(lines) // 2 :]]
        procs = []
        for n, half in enumerate(halves):
            path = Path(tmp) / f"flows-{n}.txt"
            path.write_text("\n".join(half) + "\n")
            procs.append(subprocess.Popen(["conntrack", "-R", str(path)]))
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("conntrack -R failed")
    return time.perf_counter() - started


def count_entries() -> int:
    return int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())


def flows_to(vip: str) -> int:
    from kproxy.dataplane.ctnetlink import CtSocket

    with CtSocket() as ct:
        return sum(1 for _ in ct.dump_udp(4, 53, vip))


def pyroute2_seconds_per_entry() -> float:
    """The old cleanup's cost per entry: pyroute2's decoded dump, on a sample."""
    from pyroute2 import Conntrack

    ct = Conntrack()
    try:
        started = time.perf_counter()
        n = 0
        for _ in ct.dump_entries():
            n += 1
            if n == PYROUTE2_SAMPLE:
                break
        return (time.perf_counter() - started) / max(n, 1)
    finally:
        ct.close()


class Recording:
    """The agent's cleaner, keeping its last report."""

    def __init__(self, cleaner: Any) -> None:
        self.cleaner = cleaner
        self.last: Any = None

    def clean(self, work: Any, serving: Any, deadline: float | None = None) -> Any:
        self.last = self.cleaner.clean(work, serving, deadline)
        return self.last


def run_inner(entries: int, services: int) -> None:
    from kproxy.dataplane.conntrack import ConntrackCleaner
    from kproxy.dataplane.iptables.node import IptablesNode
    from kproxy.dataplane.xtables.backend import IptablesDataplane
    from kproxy.health.healthz import ProxyHealth
    from kproxy.health.metrics import ProxyMetrics
    from kproxy.sync.loop import StateBox, SyncLoop
    from kproxy.sync.modes import MODES

    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    state = build_state(services, 2)
    add_udp_services(state)
    health, metrics = ProxyHealth(timeout=60), ProxyMetrics()
    box = StateBox("bench-node", health, metrics)
    box.state = state
    node = IptablesNode({4: IptablesDataplane(4, lock_timeout=30)}, write_sysctls=lambda s: None)
    loop = SyncLoop(box, config, MODES["iptables"], node, metrics, health)
    loop.clean_conntrack = cleaner = Recording(ConntrackCleaner())
    assert loop.sync()
    assert loop.sync()

    def tcp_change(round_: int) -> float:
        from bench.sync_bench import slice_for

        time.sleep(1)  # as minSyncPeriod would
        state.set_slice(slice_for(services // 2, [f"10.255.{round_}.1", f"10.255.{round_}.2"]))
        return timed(loop.sync)

    def remove_udp(i: int) -> tuple[float, float]:
        time.sleep(1)
        removed = time.perf_counter()
        state.delete_service(NamespacedName("bench", f"udp-{i}"))
        state.delete_slice(NamespacedName("bench", f"udp-{i}-abcde"))
        outcome = loop.sync()
        synced = time.perf_counter() - removed
        assert outcome is not None
        while flows_to(udp_vip(i)):
            time.sleep(0.01)
        return synced, time.perf_counter() - removed

    def best_of(runs: list[tuple[float, float]], name: str) -> None:
        f[f"udp_sync_{name}"] = min(run[0] for run in runs)
        f[f"udp_gone_{name}"] = min(run[1] for run in runs)

    f: dict[str, float] = {}
    tcp_change(100)  # warm: the first partial syncs after a full one are slower
    f["tcp_base"] = min(tcp_change(r) for r in range(REPEATS))
    best_of([remove_udp(i) for i in range(REPEATS)], "base")
    f["load_seconds"] = load_table(table_groups(entries, services))
    f["entries"] = count_entries()
    f["removed_flows"] = flows_to(udp_vip(REPEATS))
    f["tcp_loaded"] = min(tcp_change(10 + r) for r in range(REPEATS))
    read = flushed = 0
    runs = []
    for i in range(REPEATS, 2 * REPEATS):
        runs.append(remove_udp(i))
        read, flushed = read + cleaner.last.read, flushed + cleaner.last.flushed
    best_of(runs, "loaded")
    f["read"], f["flushed"] = read, flushed
    f["left_after"] = count_entries()
    f["pyroute2_per_entry"] = pyroute2_seconds_per_entry()
    print(__import__("json").dumps(f), flush=True)


def report(f: dict[str, float], services: int) -> None:
    entries = int(f["entries"])
    print(
        f"\n== conntrack cleanup: {entries:,} entries, {services} TCP + {UDP_SERVICES} UDP services"
    )
    print(f"table loaded with conntrack -R in {f['load_seconds']:.1f} s")
    rows = [
        ("UDP service removed: sync", f["udp_sync_loaded"], f["udp_sync_base"]),
        ("UDP service removed: flows gone", f["udp_gone_loaded"], f["udp_gone_base"]),
        ("TCP endpoint change: sync", f["tcp_loaded"], f["tcp_base"]),
    ]
    print(f"{'':34}{'loaded':>10}{'empty table':>13}{'ratio':>8}")
    for name, loaded, base in rows:
        print(f"{name:34}{loaded:9.3f}s{base:12.3f}s{loaded / base:8.2f}")
    deleted = entries - int(f["left_after"])
    print(
        f"best of {REPEATS} removals, each of a service with {int(f['removed_flows']):,} flows;"
        f" entries deleted in all: {deleted:,}; flows handed to kproxy: {int(f['read'])};"
        f" addresses flushed by filter: {int(f['flushed'])}"
    )
    old = f["pyroute2_per_entry"]
    print(
        f"old cleanup (pyroute2 dump of the whole table, in the sync): {old * 1e6:.0f} us an entry,"
        f" about {old * entries:.0f} s for this table"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=250_000)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        run_inner(args.entries, args.services)
        return
    limit = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    entries = min(args.entries, limit * 98 // 100)
    if entries < args.entries:
        print(f"nf_conntrack_max is {limit}: filling {entries:,} entries, not {args.entries:,}")
    inner = f"{sys.executable} -m bench.conntrack_bench --inner --entries {entries}"
    report(run_in_netns(args.services, f"{inner} --services {args.services}"), args.services)


if __name__ == "__main__":
    main()
