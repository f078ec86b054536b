"""Change latency of the running agent: from an EndpointSlice write at the API server to the first
TCP connection answered by the new endpoint, at a given cluster size.

    python -m bench.change_latency --services 100 --changes 20
    python -m bench.change_latency --services 10000 --mode nftables

It builds a node in network namespaces (integration/agent_harness.py): the test API server on the
node's loopback holding N ClusterIP services with E endpoints each (all but the measured service's
endpoints are addresses with no pod behind them: only rules are needed), `kproxy run` in the node
namespace, two real pods and a client pod. Then it makes `--changes` changes to the measured
service, each making the other real pod its sole endpoint, while the client opens a connection to
the service every ~10 ms with short timeouts; the latency of a change is the time from the API
write to the end of the first connection the new pod answered.

`--mode` picks the agent's proxy mode (iptables, nftables or userspace). It prints median and
worst latency and, as the baseline measured in the same run, what upstream kube-proxy's iptables
mode pays for the same one-service change on a node of the same size: its partial
`iptables-legacy-restore --noflush` (bench/sync_bench.py), in another network namespace
(`unshare -n`) holding the equivalent full table; then latency / baseline. It also prints the
agent's own sync durations for those changes, from its JSON log. Needs root; everything it
creates (namespaces, processes) is removed on exit, also on failure or Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.sync_bench import run_in_netns
from integration.agent_harness import (
    Agent,
    AgentNode,
    agent_node,
    answered_by,
    log_time,
    slice_object,
    summarize,
    wait_until,
    wall_time,
)
from integration.manifests import service_manifest
from integration.real_node import DEFAULT_KUBELET

VIP = "10.96.0.10"
PORT = 80
TARGET = 8080
CONVERGE_TIMEOUT = 600.0  # the first sync: about 2 minutes in the iptables mode on an nft node
SYNC_LOG_TIMEOUT = 60.0  # for a change's sync_completed line, written after the rules land
MODES = ("iptables", "nftables", "userspace")


def service_ip(i: int) -> str:
    """The i-th filler service's ClusterIP, clear of the measured one (10.96.0.10)."""
    return f"10.{97 + i // 65536}.{i // 256 % 256}.{i % 256}"


def endpoint_ip(i: int, j: int) -> str:
    n = i * 8 + j
    return f"10.{200 + n // 65536}.{n // 256 % 256}.{n % 256}"


def populate(node: AgentNode, services: int, endpoints: int) -> None:
    """N-1 filler services with `endpoints` (podless) endpoints each."""
    for i in range(services - 1):
        name = f"svc-{i}"
        node.api.create("Service", service_manifest(name, service_ip(i), PORT, TARGET))
        addresses = [endpoint_ip(i, j) for j in range(endpoints)]
        node.api.create("EndpointSlice", slice_object(name, addresses, TARGET))


def change_sync(agent: Agent, written: float, seen: int) -> tuple[float | None, int]:
    """The duration of the first sync that changed something and completed after `written`
    (monotonic) among the agent's syncs past the first `seen`, and how many syncs it had then.
    The line comes after the sync's whole work (health, metrics), at 10,000 services often
    seconds after the new endpoint already answers: it is waited for, not assumed."""

    def found() -> tuple[float, int] | None:
        events = agent.syncs()
        since = wall_time(written)
        for n, event in enumerate(events[seen:], start=seen + 1):
            if event["changed_services"] and log_time(event) >= since:
                return float(event["seconds"]), n
        return None

    hit = wait_until(found, SYNC_LOG_TIMEOUT, interval=0.05)
    return hit if hit is not None else (None, len(agent.syncs()))


def partial_restore_baseline(services: int, endpoints: int) -> float:
    """Seconds upstream's partial `iptables-legacy-restore --noflush` of one changed service
    takes on a node holding the same number of services (best of 2), in a namespace of its own
    whose tables nft_bench's `prepare` step filled first (untimed)."""
    size = f"--services {services} --endpoints {endpoints}"
    prepare = f"{sys.executable} -m bench.nft_bench {size} --inner prepare"
    restore = f"{sys.executable} -m bench.sync_bench {size} --inner baseline"
    # A lock of its own: no one else writes that namespace, and /run/xtables.lock is shared with
    # every other namespace's legacy writers, whose waits made the restore fail (`-w 5`).
    with tempfile.NamedTemporaryFile(prefix="kproxy-bench-lock-") as lock:
        script = f"export XTABLES_LOCKFILE={lock.name}; {prepare} && {restore}"
        return run_in_netns(services, script)["change_baseline"]


def measure(args: argparse.Namespace) -> int:
    kubelet = {} if args.kubelet is None else {"kubelet": args.kubelet}
    with (
        tempfile.TemporaryDirectory(prefix="kproxy-bench-") as workdir,
        agent_node("bench", Path(workdir), mode=args.mode, **kubelet) as node,
    ):
        # Not a test of the neighbours' rules: reading them back after a run at 10,000 services
        # (iptables-nft-save of 110,000 rules in the iptables mode) outlasts the harness's timeout.
        node.topo.foreign = None
        latencies = run_changes(node, args)
    if latencies is None:
        return 1
    report_baseline(latencies, partial_restore_baseline(args.services, args.endpoints))
    return 0


def run_changes(node: AgentNode, args: argparse.Namespace) -> list[float] | None:
    """The latency of each change, printed with the agent's syncs; None if traffic never came."""
    node.configure(args.sync_period, args.min_sync_period)
    pods = [node.backend(f"bench-{k}", f"192.168.{k}.10", TARGET) for k in (1, 2)]
    client = node.client("client", "192.168.9.9")
    built = time.monotonic()
    populate(node, args.services, args.endpoints)
    node.api.create("Service", service_manifest("measured", VIP, PORT, TARGET))
    node.api.create("EndpointSlice", slice_object("measured", [pods[0].ip], TARGET))
    agent = node.start_agent(wait=False)
    first = agent.wait_for_event("sync_completed", timeout=CONVERGE_TIMEOUT)[0]
    print(
        f"mode {args.mode} (node's iptables: {args.kubelet or DEFAULT_KUBELET}): "
        f"{args.services} services x {args.endpoints} endpoints; "
        f"syncPeriod {args.sync_period}, minSyncPeriod {args.min_sync_period}; "
        f"agent up and first (full) sync done {time.monotonic() - built:.1f} s after "
        f"the API was filled, that sync took {first['seconds']:.2f} s",
        flush=True,
    )
    poller = node.poller(client, VIP, PORT, interval=0.01, timeout=0.2)
    if poller.settled_on({pods[0].name}, 0.0, streak=5, timeout=30) == float("inf"):
        print("the measured service never answered", file=sys.stderr)
        return None
    latencies: list[float] = []
    syncs: list[float] = []
    seen = len(agent.syncs())
    for k in range(args.changes):
        target = pods[(k + 1) % 2]
        time.sleep(args.gap)
        written = time.monotonic()
        node.api.update("EndpointSlice", slice_object("measured", [target.ip], TARGET))
        answered = poller.first(answered_by(target.name), written, CONVERGE_TIMEOUT)
        if answered is None:
            print(f"change {k + 1}: {target.name} never answered", file=sys.stderr)
            return None
        latencies.append(answered.ended - written)
        took, seen = change_sync(agent, written, seen)
        if took is not None:
            syncs.append(took)
    attempts = poller.stop()
    failed = summarize([a for a in attempts if not a.ok])
    report(latencies, syncs, failed, len(attempts))
    return latencies


def report(latencies: list[float], syncs: list[float], failed: dict[str, int], total: int) -> None:
    lat_median, lat_worst = statistics.median(latencies), max(latencies)
    how = ", ".join(f"{outcome} {n}" for outcome, n in sorted(failed.items()))
    print(
        f"changes: {len(latencies)}; client connections: {total}, "
        f"failed: {sum(failed.values())}" + (f" ({how})" if how else "")
    )
    print(
        f"API write -> first connection answered by the new endpoint: "
        f"median {lat_median * 1000:.0f} ms, worst {lat_worst * 1000:.0f} ms"
    )
    if syncs:
        print(
            f"agent sync (from its log, {len(syncs)} syncs): median "
            f"{statistics.median(syncs) * 1000:.0f} ms, worst {max(syncs) * 1000:.0f} ms"
        )
    else:
        print("agent sync: no sync_completed line for these changes in its log")


def report_baseline(latencies: list[float], baseline: float) -> None:
    lat_median, lat_worst = statistics.median(latencies), max(latencies)
    print(
        f"baseline, upstream's partial iptables-legacy-restore --noflush of one service "
        f"(another namespace, same size): {baseline * 1000:.0f} ms"
    )
    print(
        f"latency / baseline: median {lat_median / baseline:.2f}x, "
        f"worst {lat_worst / baseline:.2f}x",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.change_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--mode", choices=MODES, default="iptables", help="the agent's proxy mode")
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument(
        "--kubelet",
        choices=("nft", "legacy"),
        default=None,
        help="the node's iptables backend (where the iptables mode writes); default: the harness's",
    )
    parser.add_argument("--endpoints", type=int, default=5, help="per filler service (max 8)")
    parser.add_argument("--sync-period", default="30s", help="kube-proxy's default: 30s")
    parser.add_argument("--min-sync-period", default="1s", help="kube-proxy's default: 1s")
    parser.add_argument(
        "--gap", type=float, default=1.5, help="seconds between changes (above minSyncPeriod)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.endpoints <= 8:
        parser.error("--endpoints must be 1 to 8")
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the namespaces and the agent are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return measure(args)
    except KeyboardInterrupt:
        print("interrupted; namespaces and processes removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
