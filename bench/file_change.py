"""The file source after a one-file edit: from the write to the change being in the cluster state
(what the sync loop then picks up), at N services, for `kproxy run --manifests`.

    python -m bench.file_change --services 10000

Two layouts: every Service with its EndpointSlice in a file of its own, and one big file of N-1
services plus one small file with the measured one. In each, the measured service's file is
rewritten `--changes` times (a new endpoint each time), and three ways of delivering that change
are timed in the same run:

- full reload (the baseline): what the file source did before re-reading only changed files:
  signature every file, parse every file, replace every Service and EndpointSlice;
- incremental: ManifestSource.poll, which parses only the changed file and touches only its
  objects;
- API event: the same change arriving as one watch event (decode the object, upsert it): the
  work of the API path, without the network.

It prints medians and the ratios full/incremental and incremental/API, and how many services each
reports as changed (what decides a partial sync).

Then the source runs as the agent runs it (its own thread, `poll_seconds` 1 s) and the time from
the start of a one-file write to the mutation reaching the sink is measured, `--live-changes`
times, each write after a random pause (so the poll is caught at any point of its interval):

- inotify: the change noticed by its event, only that file re-read;
- poll: the source without inotify, noticing the change by its stat scan every second.

Both against the same API event. No root needed; the files live in a temporary directory
removed on exit.

`--agent --mode iptables|nftables|userspace` (root) measures the whole road instead: `kproxy run
--manifests DIR` in a node namespace (integration/agent_harness.py), one file per service (N-1
filler services with `--endpoints` podless endpoints each, the measured one with a real pod), then
the measured service's file rewritten `--changes` times, each making the other of two real pods
its sole endpoint, while a client opens a connection every ~10 ms: the time from the start of the
write to the end of the first connection the new pod answered, beside the agent's own seconds
for the sync that carried each change (from its log: what is left is the file source's part of
the road, with the write and the connection's detection). Baseline, in the same run:
upstream's partial `iptables-legacy-restore --noflush` of one service on a node of the same size
(bench.change_latency's), and the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench.change_latency import (
    MODES,
    PORT,
    TARGET,
    VIP,
    change_sync,
    endpoint_ip,
    partial_restore_baseline,
    service_ip,
)
from bench.sync_bench import timed
from integration.agent_harness import (
    AgentNode,
    agent_node,
    answered_by,
    node_object,
    slice_object,
)
from integration.manifests import service_manifest
from integration.real_node import DEFAULT_KUBELET
from kproxy.logs import configure_logging
from kproxy.model.kinds import Kind
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import Mutation, combine, replace_all, set_node, upsert
from kproxy.watch.files import ManifestSource
from kproxy.watch.manifests import load_manifests, manifest_files
from kproxy.watch.supervisor import Supervisor

NODE = "node-1"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class StateSink:
    def __init__(self) -> None:
        self.state = ClusterState()

    def apply(self, mutation: Mutation) -> None:
        mutation(self.state)

    def synced(self, kind: Kind) -> None:
        pass


def objects(i: int, endpoint: str) -> list[dict[str, Any]]:
    ip = f"10.{97 + i // 65536}.{i // 256 % 256}.{i % 256}"
    return [service_manifest(f"svc-{i}", ip, 80, 8080), slice_object(f"svc-{i}", [endpoint], 8080)]


def dump(path: Path, docs: list[dict[str, Any]]) -> None:
    path.write_text(yaml.dump_all(docs, Dumper=_DUMPER))


def build(root: Path, services: int, layout: str) -> Path:
    """The manifests; returns the measured service's file."""
    if layout == "separate":
        for i in range(services):
            dump(root / f"svc-{i:05d}.yaml", objects(i, "10.200.0.1"))
        return root / f"svc-{services - 1:05d}.yaml"
    dump(root / "big.yaml", [o for i in range(services - 1) for o in objects(i, "10.200.0.1")])
    dump(root / "small.yaml", objects(services - 1, "10.200.0.1"))
    return root / "small.yaml"


class ArrivalSink:
    """Passes mutations on to `inner` and notes when the first one after `expect()` arrived."""

    def __init__(self, inner: StateSink) -> None:
        self.inner = inner
        self.arrived = threading.Event()
        self.at = 0.0

    def expect(self) -> None:
        self.arrived.clear()

    def apply(self, mutation: Mutation) -> None:
        self.inner.apply(mutation)
        if not self.arrived.is_set():
            self.at = time.perf_counter()
            self.arrived.set()

    def synced(self, kind: Kind) -> None:
        pass


def write_to_sink(
    source: ManifestSource, sink: StateSink, measured: Path, args: argparse.Namespace, base: int
) -> tuple[list[float], list[float]]:
    """Seconds from the start of each one-file write to its mutation in the sink, the source
    running in its own thread as in the agent, and of that the write itself."""
    arrival = ArrivalSink(sink)
    stop = threading.Event()
    supervisor = Supervisor("files", lambda sup: source.run(arrival, sup), stop)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    rng = random.Random(base)
    latencies, writes = [], []
    try:
        time.sleep(source.poll_seconds * 2)  # the first scan (nothing changed) is done
        for k in range(args.live_changes):
            time.sleep(rng.uniform(0, source.poll_seconds))
            docs = objects(args.services - 1, f"10.202.{base}.{k + 2}")
            arrival.expect()
            started = time.perf_counter()
            dump(measured, docs)
            writes.append(time.perf_counter() - started)
            if not arrival.arrived.wait(30):
                raise RuntimeError("the change never reached the sink")
            latencies.append(arrival.at - started)
    finally:
        stop.set()
        thread.join()
    return latencies, writes


def live(
    root: Path,
    source: ManifestSource,
    sink: StateSink,
    measured: Path,
    args: argparse.Namespace,
    layout: str,
    api: float,
) -> None:
    result = {}
    writes: list[float] = []
    for base, use_inotify in ((1, True), (2, False)):
        source.use_inotify = use_inotify
        times, wrote = write_to_sink(source, sink, measured, args, base)
        result["inotify" if use_inotify else "poll"] = statistics.median(times)
        writes += wrote
    print(
        f"{layout:>8}: write -> sink: inotify {result['inotify'] * 1000:7.2f} ms, "
        f"poll {result['poll'] * 1000:7.1f} ms (the write itself "
        f"{statistics.median(writes) * 1000:.2f} ms), API event {api * 1000:6.3f} ms; "
        f"poll / inotify {result['poll'] / result['inotify']:6.0f}x, "
        f"inotify / API {result['inotify'] / api:6.1f}x, "
        f"poll / API {result['poll'] / api:7.0f}x",
        flush=True,
    )


def full_reload(root: Path, sink: StateSink) -> None:
    """The file source's old reload: signature of every file, parse all, replace everything."""
    for f in manifest_files(root):
        f.stat()
    manifests = load_manifests(root)
    mutation = combine(
        set_node(NODE, manifests.nodes),
        replace_all(Kind.SERVICE, manifests.services),
        replace_all(Kind.ENDPOINT_SLICE, manifests.endpoint_slices),
    )
    sink.apply(mutation)


def measure(root: Path, args: argparse.Namespace, layout: str) -> dict[str, float]:
    measured = build(root, args.services, layout)
    source = ManifestSource(str(root), NODE)
    incremental, baseline = StateSink(), StateSink()
    api = StateSink()
    source.poll(incremental)
    full_reload(root, baseline)
    everything = load_manifests(root)
    api.apply(replace_all(Kind.SERVICE, everything.services))
    api.apply(replace_all(Kind.ENDPOINT_SLICE, everything.endpoint_slices))
    for sink in (incremental, baseline, api):
        sink.state.take_changes()
    times: dict[str, list[float]] = {"full": [], "incremental": [], "api": []}
    changed: dict[str, int] = {}
    for k in range(args.changes):
        docs = objects(args.services - 1, f"10.201.0.{k + 2}")
        dump(measured, docs)
        event = json.dumps(docs[1]).encode()
        times["full"].append(timed(lambda: full_reload(root, baseline)))
        times["incremental"].append(timed(lambda: source.poll(incremental)))

        def api_event(raw: bytes = event) -> None:
            api.apply(upsert(Kind.ENDPOINT_SLICE, json.loads(raw)))

        times["api"].append(timed(api_event))
        for name, sink in (("full", baseline), ("incremental", incremental), ("api", api)):
            changed[name] = len(sink.state.take_changes())
    for name, sink in (("full", baseline), ("incremental", incremental)):
        assert sink.state.endpoints_map() == api.state.endpoints_map(), name
    result = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{layout:>8}: full reload {result['full'] * 1000:8.1f} ms, "
        f"incremental {result['incremental'] * 1000:7.2f} ms, "
        f"API event {result['api'] * 1000:6.3f} ms; "
        f"full / incremental {result['full'] / result['incremental']:7.0f}x, "
        f"incremental / API {result['incremental'] / result['api']:6.1f}x; "
        f"services reported changed: {changed}",
        flush=True,
    )
    live(root, source, incremental, measured, args, layout, result["api"])
    return result


def agent_files(root: Path, services: int, endpoints: int) -> None:
    """The node's Node and N-1 filler services, one file each."""
    dump(root / "node.yaml", [node_object()])
    for i in range(services - 1):
        addresses = [endpoint_ip(i, j) for j in range(endpoints)]
        docs = [
            service_manifest(f"svc-{i}", service_ip(i), PORT, TARGET),
            slice_object(f"svc-{i}", addresses, TARGET),
        ]
        dump(root / f"svc-{i:05d}.yaml", docs)


def measured_docs(ip: str) -> list[dict[str, Any]]:
    return [service_manifest("measured", VIP, PORT, TARGET), slice_object("measured", [ip], TARGET)]


def agent_change(args: argparse.Namespace) -> int:
    kubelet = {} if args.kubelet is None else {"kubelet": args.kubelet}
    with (
        tempfile.TemporaryDirectory(prefix="kproxy-bench-") as workdir,
        agent_node("fbench", Path(workdir), with_api=False, mode=args.mode, **kubelet) as node,
    ):
        # Not a test of the neighbours' rules: reading them back at 10,000 services (through
        # iptables-nft-save, 110,000 rules) takes longer than the harness allows.
        node.topo.foreign = None
        measured = agent_latencies(node, Path(workdir) / "manifests", args)
    if measured is None:
        return 1
    latencies, syncs = measured
    if syncs:
        print(
            f"agent sync (from its log, {len(syncs)} syncs): median "
            f"{statistics.median(syncs) * 1000:.0f} ms; latency minus sync (roughly the road "
            f"outside it: the write, the file source, the snapshot, the connection): median "
            f"{(statistics.median(latencies) - statistics.median(syncs)) * 1000:.0f} ms",
            flush=True,
        )
    baseline = partial_restore_baseline(args.services, args.endpoints)
    median, worst = statistics.median(latencies), max(latencies)
    print(
        f"file write -> first connection answered by the new endpoint: "
        f"median {median * 1000:.0f} ms, worst {worst * 1000:.0f} ms; partial restore "
        f"{baseline * 1000:.0f} ms; latency / baseline: median {median / baseline:.2f}x, "
        f"worst {worst / baseline:.2f}x",
        flush=True,
    )
    return 0


def agent_latencies(
    node: AgentNode, root: Path, args: argparse.Namespace
) -> tuple[list[float], list[float]] | None:
    """Each change's latency to traffic, and the agent's own seconds for the sync that carried
    it (from its log); None if traffic never came."""
    node.configure("30s", "1s")  # kube-proxy's defaults
    pods = [node.backend(f"bench-{k}", f"192.168.{k}.10", TARGET) for k in (1, 2)]
    client = node.client("client", "192.168.9.9")
    root.mkdir()
    agent_files(root, args.services, args.endpoints)
    measured = root / "measured.yaml"
    dump(measured, measured_docs(pods[0].ip))
    agent = node.start_agent("--manifests", str(root), wait=False)
    first = agent.wait_for_event("sync_completed", timeout=600)[0]
    print(
        f"mode {args.mode} (node's iptables: {args.kubelet or DEFAULT_KUBELET}), "
        f"{args.services} services, one file each; first sync "
        f"{first['seconds']:.2f} s",
        flush=True,
    )
    poller = node.poller(client, VIP, PORT, interval=0.01, timeout=0.2)
    if poller.settled_on({pods[0].name}, 0.0, streak=5, timeout=60) == float("inf"):
        print("the measured service never answered", file=sys.stderr)
        return None
    latencies, syncs = [], []
    seen = len(agent.syncs())
    for k in range(args.changes):
        target = pods[(k + 1) % 2]
        time.sleep(1.5)  # above minSyncPeriod
        written = time.monotonic()
        dump(measured, measured_docs(target.ip))
        answered = poller.first(answered_by(target.name), written, 120)
        if answered is None:
            print(f"change {k + 1}: {target.name} never answered", file=sys.stderr)
            return None
        latencies.append(answered.ended - written)
        took, seen = change_sync(agent, written, seen)
        if took is not None:
            syncs.append(took)
    poller.stop()
    return latencies, syncs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.file_change",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--live-changes", type=int, default=10, help="writes timed to the sink")
    parser.add_argument("--agent", action="store_true", help="the agent, to traffic (root)")
    parser.add_argument("--mode", choices=MODES, default="nftables", help="with --agent")
    parser.add_argument("--endpoints", type=int, default=5, help="with --agent: per filler")
    parser.add_argument("--kubelet", choices=("nft", "legacy"), default=None, help="with --agent")
    args = parser.parse_args(argv)
    if args.agent:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # namespaces removed
        return agent_change(args)
    configure_logging("warning")
    print(f"{args.services} services, {args.changes} one-file changes each (medians)")
    for layout in ("separate", "big+small"):
        with tempfile.TemporaryDirectory(prefix="kproxy-files-") as root:
            measure(Path(root), args, layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
