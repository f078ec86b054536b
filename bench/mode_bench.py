"""The userspace mode against the iptables mode, through one ClusterIP, in one run.

    python -m bench.mode_bench              # as root; 2 rounds of 2-second windows, ~2.5 min
    python -m bench.mode_bench --quick      # one round of 1-second windows, about 45 s
    python -m bench.mode_bench --rounds 3 --seconds 3 --endpoints 1

It builds a node in network namespaces (integration/netns.py): two endpoint pods running
bench/mode_load.py's servers, a client pod, and three services: `bench-bulk` (a sink),
`bench-echo` (echo) and `bench-dns` (UDP, a kube-dns stand-in). Each figure is measured three
times, with the same load: first directly against the pod IPs (no service: the baseline the added
latency is counted from), then through the ClusterIP in the iptables mode (`kproxy sync --once`),
then through the same ClusterIP in the userspace mode (`kproxy sync --once` with `mode: userspace`,
which programs the portals and relays in the foreground until SIGTERM). A round is those three
passes; each further round switches the node back to the iptables mode in place and repeats them.
Printed per figure: each mode's best round (interference on a shared machine only ever slows a
window down), the ratio userspace/iptables of those and of every round; for latencies also what
each mode adds to the direct path.

Figures, at 1 and 64 concurrent clients: bulk TCP throughput; new connections per second
(connect, one 64-byte request and reply, close) and their connect-to-reply latency; requests per
second and latency on persistent connections; UDP questions and answers per second.

The load generators run in the client pod, one process per 32 clients (one selectors loop each),
and report their own CPU time; the servers' and the relay's CPU time are read from /proc. The
CPU table printed after the figures shows which of the three was busy: a client well under 100%
of a core while the relay is at 100% means the relay, not the client, set the figure.

Needs root. Everything it creates (namespaces, processes) is removed on exit, also on failure or
Ctrl-C/SIGTERM; the root namespace's tables, routes and sysctls are never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import mode_load
from integration.manifests import NODE_NAME, endpoint_slice_manifest, service_manifest
from integration.netns import (
    NODE_IP,
    Pod,
    Topology,
    kproxy_path,
    read_line,
    run_kproxy,
    stop,
    topology,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
BULK_VIP, ECHO_VIP, DNS_VIP = "10.96.100.10", "10.96.100.11", "10.96.100.53"
CLIENT_IP = "192.168.9.9"
CLIENTS_PER_PROCESS = 32
START_DELAY = 0.7  # seconds for the load processes to start before their common start time
MODES = ("direct", "iptables", "userspace")
# New connections at several thousand a second: without these the client's and the relay's
# ephemeral ports run out against TIME_WAIT within seconds.
CONNECTING_SYSCTLS = {
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.ip_local_port_range": "1024 65000",
}


@dataclass(frozen=True)
class Figure:
    kind: str  # a mode_load kind
    clients: int

    @property
    def label(self) -> str:
        name = {
            "bulk": "bulk TCP",
            "connect": "new connections",
            "persistent": "persistent req/reply",
            "udp": "UDP (DNS-like)",
        }[self.kind]
        return f"{name}, {self.clients} client{'s' if self.clients > 1 else ''}"


FIGURES = tuple(Figure(k, c) for k in mode_load.KINDS for c in (1, 64))


@dataclass
class Measured:
    """One figure in one mode: merged over the load processes."""

    ops: int
    bytes: int
    errors: int
    wall: float
    latencies_us: list[int]
    client_cpu: float  # of one core, summed over the load processes
    server_cpu: float
    relay_cpu: float
    machine_busy: float  # of both cores, everything on the machine (other work too)

    def rate(self) -> float:
        return self.ops / self.wall

    def throughput_mb(self) -> float:
        return self.bytes / self.wall / 1e6

    def percentile(self, q: float) -> float:
        lat = self.latencies_us
        return float(lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else float("nan")


class BenchNode:
    """The simulated node, its pods and servers, and kproxy in either mode."""

    def __init__(self, topo: Topology, workdir: Path, endpoints: int) -> None:
        self.topo = topo
        self.manifests = workdir / "manifests"
        self.manifests.mkdir()
        self.lock_file = workdir / "xtables.lock"
        self.servers: list[subprocess.Popen[str]] = []
        self.pods: list[Pod] = []
        for k in range(1, endpoints + 1):
            pod = topo.add_pod(f"server-{k}", f"192.168.{k}.10")
            self.pods.append(pod)
            proc = topo.spawn(pod.ns, self.python("serve"))
            if read_line(proc, timeout=30) != mode_load.READY:
                raise RuntimeError(f"the server in {pod.name} did not start")
            self.servers.append(proc)
        self.client = topo.add_pod("client", CLIENT_IP)
        self.client.ns.sysctl(CONNECTING_SYSCTLS)
        topo.node.sysctl(CONNECTING_SYSCTLS)
        self.relay: subprocess.Popen[str] | None = None
        self._write_services()

    @staticmethod
    def python(*args: str) -> list[str]:
        return [sys.executable, "-m", "bench.mode_load", *args]

    def _write_services(self) -> None:
        for name, vip, port, target, proto in (
            ("bench-bulk", BULK_VIP, 80, mode_load.SINK_PORT, "TCP"),
            ("bench-echo", ECHO_VIP, 80, mode_load.ECHO_PORT, "TCP"),
            ("bench-dns", DNS_VIP, 53, mode_load.DNS_PORT, "UDP"),
        ):
            docs = [
                service_manifest(name, vip, port, target, proto),
                endpoint_slice_manifest(name, self.pods, target, proto),
            ]
            (self.manifests / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))

    def targets(self, mode: str, kind: str) -> str:
        """HOST:PORT list for mode_load: the pods themselves, or the service's ClusterIP."""
        if mode == "direct":
            port = {
                "bulk": mode_load.SINK_PORT,
                "udp": mode_load.DNS_PORT,
            }.get(kind, mode_load.ECHO_PORT)
            return ",".join(f"{pod.ip}:{port}" for pod in self.pods)
        return {"bulk": f"{BULK_VIP}:80", "udp": f"{DNS_VIP}:53"}.get(kind, f"{ECHO_VIP}:80")

    def sync_args(self) -> list[str]:
        manifests = str(self.manifests)
        return ["sync", "--once", "--manifests", manifests, "--hostname-override", NODE_NAME]

    def start_iptables(self) -> None:
        out = run_kproxy(self.topo.node, *self.sync_args(), lock_file=self.lock_file).stdout
        print(f"iptables mode: {out.strip()}", flush=True)

    def start_userspace(self) -> None:
        config = self.manifests.parent / "kube-proxy-userspace.yaml"
        doc = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}
        # bindAddress is the node's address: this routed topology's pod veths carry no address
        # a REDIRECT could use (integration/userspace/test_userspace.py explains).
        config.write_text(yaml.safe_dump({**doc, "mode": "userspace", "bindAddress": NODE_IP}))
        argv = [str(kproxy_path()), "--log-level", "warning", *self.sync_args()]
        argv += ["--config", str(config)]
        self.relay = self.topo.spawn(
            self.topo.node, argv, env={"XTABLES_LOCKFILE": str(self.lock_file)}
        )
        summary = read_line(self.relay, timeout=60)
        if not summary.startswith("synced "):
            raise RuntimeError(f"userspace mode did not start: {summary}")
        print(f"userspace mode: {summary}", flush=True)

    def stop_userspace(self) -> None:
        if self.relay is not None:
            stop(self.relay)
            self.relay = None

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds used so far by the servers (together) and the relay."""
        servers = sum(_proc_cpu(p.pid) for p in self.servers)
        return servers, (_proc_cpu(self.relay.pid) if self.relay is not None else 0.0)

    def measure(self, mode: str, figure: Figure, seconds: float) -> Measured:
        procs = max(1, -(-figure.clients // CLIENTS_PER_PROCESS))
        start_at = time.time() + START_DELAY
        loads = []
        for k in range(procs):
            share = figure.clients // procs + (k < figure.clients % procs)
            args = ["client", "--kind", figure.kind, "--targets", self.targets(mode, figure.kind)]
            args += ["--clients", str(share), "--seconds", str(seconds)]
            args += ["--start-at", f"{start_at:.3f}"]
            loads.append(self.topo.spawn(self.client.ns, self.python(*args)))
        time.sleep(max(0.0, start_at - time.time()))
        server0, relay0 = self.cpu_seconds()
        busy0 = _machine_ticks()
        results = [_collect(load, seconds + 60) for load in loads]
        server1, relay1 = self.cpu_seconds()
        busy1 = _machine_ticks()
        wall = max(r["wall"] for r in results)
        return Measured(
            ops=sum(r["ops"] for r in results),
            bytes=sum(r["bytes"] for r in results),
            errors=sum(r["errors"] for r in results),
            wall=wall,
            latencies_us=sorted(x for r in results for x in r["latencies_us"]),
            client_cpu=sum(r["cpu"] for r in results) / wall,
            server_cpu=(server1 - server0) / wall,
            relay_cpu=(relay1 - relay0) / wall,
            machine_busy=(busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        )


def _proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads) in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat (read only)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def _collect(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"load generator exited {proc.returncode}: {err.strip()}")
    result: dict[str, object] = json.loads(out)
    return result


# --- report ------------------------------------------------------------------------------------


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _ratio(us: float, ipt: float) -> str:
    return f"{us / ipt:6.2f}" if ipt else "   n/a"


Results = dict[tuple[str, Figure], list[Measured]]  # one Measured per round


def best(runs: list[Measured]) -> Measured:
    """The round with the highest rate: on a shared machine, interference only ever slows a
    window down, so the best window is the closest to what the path itself costs."""
    return max(runs, key=lambda m: (m.throughput_mb(), m.rate()))


def render(results: Results) -> list[str]:
    """The figures table (best round per mode, ratio userspace/iptables, and that ratio in each
    round) and the CPU table."""
    head = f"{'figure':38} {'direct':>10} {'iptables':>10} {'userspace':>10} {'us/ipt':>6}"
    rows = [head + "  per round", "-" * len(head)]
    for figure in FIGURES:
        runs = [results.get((mode, figure)) for mode in MODES]
        if any(not r for r in runs):
            continue
        d, i, u = (best(r) for r in runs if r)
        ipt_runs, us_runs = results[("iptables", figure)], results[("userspace", figure)]
        if figure.kind == "bulk":
            rounds = [
                _div(b.throughput_mb(), a.throughput_mb())
                for a, b in zip(ipt_runs, us_runs, strict=True)
            ]
            values = d.throughput_mb(), i.throughput_mb(), u.throughput_mb()
            rows.append(_row(f"{figure.label} MB/s", *values) + _rounds(rounds))
            continue
        rounds = [_div(b.rate(), a.rate()) for a, b in zip(ipt_runs, us_runs, strict=True)]
        unit = "conn/s" if figure.kind == "connect" else "req/s"
        rows.append(_row(f"{figure.label} {unit}", d.rate(), i.rate(), u.rate()) + _rounds(rounds))
        what = "connect+reply" if figure.kind == "connect" else "round trip"
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            dq, iq, uq = d.percentile(q), i.percentile(q), u.percentile(q)
            rows.append(
                _row(f"  {what} {name} us", dq, iq, uq)
                + f"  added: iptables {iq - dq:+.0f} us, userspace {uq - dq:+.0f} us"
            )
    rows += [
        "",
        "CPU in the best rounds, % of one core: client processes / servers / relay; the",
        "machine's two cores busy (anything: kernel, other work); failed operations (timeouts,",
        "resets, lost datagrams); the relay's CPU per operation (per MB for bulk):",
    ]
    for figure in FIGURES:
        parts = []
        for mode in MODES:
            if runs := results.get((mode, figure)):
                m = best(runs)
                cpu = f"{m.client_cpu:4.0%}/{m.server_cpu:4.0%}/{m.relay_cpu:4.0%}"
                parts.append(f"{mode[:3]} {cpu} {m.machine_busy:4.0%} err {m.errors}")
                if mode == "userspace":
                    bulk = figure.kind == "bulk"
                    per, unit = (m.bytes / 1e6, "MB") if bulk else (m.ops, "op")
                    parts[-1] += f", relay {m.relay_cpu * m.wall / max(per, 1) * 1e6:.0f} us/{unit}"
        rows.append(f"  {figure.label:33}" + "  ".join(parts))
    return rows


def _rounds(ratios: list[float]) -> str:
    return "  " + " ".join(f"{r:.2f}" for r in ratios)


def _row(label: str, direct: float, ipt: float, us: float) -> str:
    return f"{label:38} {direct:10.1f} {ipt:10.1f} {us:10.1f} {_ratio(us, ipt)}"


# --- run ---------------------------------------------------------------------------------------


def run_all(node: BenchNode, seconds: float, rounds: int) -> Results:
    """Each round: every figure directly, then in the iptables mode, then in the userspace mode
    (which the next round's iptables sync switches back from, in place)."""
    results: Results = {}
    for k in range(1, rounds + 1):
        print(f"round {k} of {rounds}", flush=True)
        for mode in MODES:
            if mode == "iptables":
                node.start_iptables()
            elif mode == "userspace":
                node.start_userspace()
            for figure in FIGURES:
                m = node.measure(mode, figure, seconds)
                results.setdefault((mode, figure), []).append(m)
                print(f"  {mode:9} {figure.label:33} ops {m.ops:7} errors {m.errors}", flush=True)
        node.stop_userspace()
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mode_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each window")
    parser.add_argument("--rounds", type=int, default=2, help="best of this many rounds")
    parser.add_argument("--quick", action="store_true", help="one round of 1-second windows")
    parser.add_argument("--endpoints", type=int, choices=(1, 2), default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 1.0, 1
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("mode_bench creates network namespaces: run it as root", file=sys.stderr)
        return 2
    # Every child (kproxy, servers, load generators) imports this tree, not an installed one.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="kproxy-mode-bench-") as workdir,
            topology("mb") as topo,
        ):
            node = BenchNode(topo, Path(workdir), args.endpoints)
            print(
                f"{args.endpoints} endpoint pod(s), {args.seconds:g} s per window, "
                f"best of {args.rounds} round(s), "
                f"kernel {os.uname().release}, {os.cpu_count()} CPUs",
                flush=True,
            )
            results = run_all(node, args.seconds, args.rounds)
    except KeyboardInterrupt:
        print("interrupted; namespaces and processes removed", file=sys.stderr)
        return 130
    print()
    for row in render(results):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
