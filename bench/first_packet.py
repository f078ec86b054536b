"""The first packet's cost: a new connection to the first and to the last of N services, in the
nftables mode (verdict maps) and the iptables mode (KUBE-SERVICES walked rule by rule), in one run.

    python -m bench.first_packet --services 10000      # root; re-runs itself under `unshare -n`

In a network namespace of its own: N ClusterIP services (10.96.0.0/12) of E endpoints each
(10.128.0.0/10), programmed by kproxy's own sync (SyncLoop, planner, dataplane) in each mode in
turn. The endpoint range is a local route, so one server on port 8080 answers every endpoint,
and a connection's whole handshake happens inside the namespace. Each figure is the median of
many connects alternating between the first service in the rules' order (`svc-0`) and the last
(`svc-9999` sorts last in KUBE-SERVICES); the ratio last/first is what the lookup adds.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from bench.sync_bench import build_state, service_ip
from kproxy.model.config import ProxyConfig

PORT = 80
TARGET = 8080
CONNECTS = 3000


def _serve(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        conn.close()


def _connect_seconds(address: str) -> float:
    started = time.perf_counter()
    with socket.create_connection((address, PORT), timeout=2.0):
        pass
    return time.perf_counter() - started


def measure(first: str, last: str, connects: int) -> tuple[float, float]:
    """Median connect time to `first` and to `last`, alternating, after a warm-up."""
    times: dict[str, list[float]] = {first: [], last: []}
    for _ in range(50):
        _connect_seconds(first)
        _connect_seconds(last)
    for _ in range(connects):
        for address in (first, last):
            times[address].append(_connect_seconds(address))
    return statistics.median(times[first]), statistics.median(times[last])


def program(mode: str, services: int, endpoints: int) -> None:
    """kproxy's own sync of the cluster in `mode`, in this process."""
    from kproxy.health.healthz import ProxyHealth
    from kproxy.health.metrics import ProxyMetrics
    from kproxy.sync.loop import StateBox, SyncLoop
    from kproxy.sync.modes import MODES

    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    health, metrics = ProxyHealth(timeout=60), ProxyMetrics()
    box = StateBox("bench-node", health, metrics)
    box.state = build_state(services, endpoints)
    proxy_mode = MODES[mode]
    with proxy_mode.open_dataplane(config, 30.0) as dataplane:
        loop = SyncLoop(box, config, proxy_mode, dataplane, metrics, health)
        loop.sync_or_raise()


def inner(services: int, endpoints: int, connects: int) -> None:
    for command in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "route", "add", "local", "10.128.0.0/10", "dev", "lo"],
        ["ip", "route", "add", "10.96.0.0/12", "dev", "lo"],
    ):
        subprocess.run(command, check=True)
    server = socket.create_server(("0.0.0.0", TARGET), backlog=1024)
    threading.Thread(target=_serve, args=(server,), daemon=True).start()
    first, last = service_ip(0), service_ip(services - 1)
    print(f"{services} services x {endpoints} endpoints; first {first}, last {last}")
    print(f"{'mode':10} {'first us':>9} {'last us':>9} {'last/first':>11}")
    for mode in ("nftables", "iptables"):
        program(mode, services, endpoints)
        a, b = measure(first, last, connects)
        print(f"{mode:10} {a * 1e6:9.1f} {b * 1e6:9.1f} {b / a:11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--connects", type=int, default=CONNECTS)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.services, args.endpoints, args.connects)
        return
    argv = [sys.executable, "-m", "bench.first_packet", "--inner"]
    argv += ["--services", str(args.services), "--endpoints", str(args.endpoints)]
    argv += ["--connects", str(args.connects)]
    sys.exit(subprocess.run(["unshare", "-n", *argv], check=False, env=os.environ).returncode)


if __name__ == "__main__":
    main()
