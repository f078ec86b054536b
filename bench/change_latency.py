"""Change latency of the running agent: from an EndpointSlice write at the API server to the first
TCP connection answered by the new endpoint, at a given cluster size.

    python -m bench.change_latency --services 100 --changes 20
    python -m bench.change_latency --services 1000 --changes 20

It builds a node in network namespaces (integration/agent_harness.py): the test API server on the
node's loopback holding N ClusterIP services with E endpoints each (all but the measured service's
endpoints are addresses with no pod behind them: only rules are needed), `kproxy run` in the node
namespace, two real pods and a client pod. Then it makes `--changes` changes to the measured
service, each making the other real pod its sole endpoint, while the client opens a connection to
the service every ~10 ms with short timeouts; the latency of a change is the time from the API
write to the end of the first connection the new pod answered.

It prints median and worst latency, the agent's own sync durations for those changes (from its
JSON log) as the baseline measured in the same run, and their ratio: what the watch, queueing and
the client add on top of the sync itself. Needs root; everything it creates (namespaces,
processes) is removed on exit, also on failure or Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from integration.agent_harness import (
    Agent,
    AgentNode,
    agent_node,
    answered_by,
    log_time,
    slice_object,
    wall_time,
)
from integration.manifests import service_manifest

VIP = "10.96.0.10"
PORT = 80
TARGET = 8080
CONVERGE_TIMEOUT = 120.0


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


def syncs_between(agent: Agent, start: float, end: float) -> list[float]:
    """Durations of the syncs that changed something and completed in [start, end] (monotonic)."""
    return [
        float(e["seconds"])
        for e in agent.syncs()
        if e["changed_services"] and wall_time(start) <= log_time(e) <= wall_time(end)
    ]


def measure(args: argparse.Namespace) -> int:
    with (
        tempfile.TemporaryDirectory(prefix="kproxy-bench-") as workdir,
        agent_node("bench", Path(workdir)) as node,
    ):
        return run_changes(node, args)


def run_changes(node: AgentNode, args: argparse.Namespace) -> int:
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
        f"{args.services} services x {args.endpoints} endpoints; "
        f"syncPeriod {args.sync_period}, minSyncPeriod {args.min_sync_period}; "
        f"agent up and first (full) sync done {time.monotonic() - built:.1f} s after "
        f"the API was filled, that sync took {first['seconds']:.2f} s",
        flush=True,
    )
    poller = node.poller(client, VIP, PORT, interval=0.01, timeout=0.2)
    if poller.settled_on({pods[0].name}, 0.0, streak=5, timeout=30) == float("inf"):
        print("the measured service never answered", file=sys.stderr)
        return 1
    latencies: list[float] = []
    syncs: list[float] = []
    for k in range(args.changes):
        target = pods[(k + 1) % 2]
        time.sleep(args.gap)
        written = time.monotonic()
        node.api.update("EndpointSlice", slice_object("measured", [target.ip], TARGET))
        answered = poller.first(answered_by(target.name), written, CONVERGE_TIMEOUT)
        if answered is None:
            print(f"change {k + 1}: {target.name} never answered", file=sys.stderr)
            return 1
        latencies.append(answered.ended - written)
        time.sleep(0.2)  # let the sync's log line land
        syncs += syncs_between(agent, written, time.monotonic())
    attempts = poller.stop()
    report(args, latencies, syncs, sum(not a.ok for a in attempts), len(attempts))
    return 0


def report(
    args: argparse.Namespace, latencies: list[float], syncs: list[float], failed: int, total: int
) -> None:
    lat_median, lat_worst = statistics.median(latencies), max(latencies)
    sync_median, sync_worst = statistics.median(syncs), max(syncs)
    print(f"changes: {len(latencies)}; client connections: {total}, failed: {failed}")
    print(
        f"API write -> first connection answered by the new endpoint: "
        f"median {lat_median * 1000:.0f} ms, worst {lat_worst * 1000:.0f} ms"
    )
    print(
        f"agent sync (baseline, from its log, {len(syncs)} syncs): "
        f"median {sync_median * 1000:.0f} ms, worst {sync_worst * 1000:.0f} ms"
    )
    print(
        f"latency / sync: median {lat_median / sync_median:.2f}x, "
        f"worst {lat_worst / sync_worst:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.change_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--changes", type=int, default=20)
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
