"""The userspace relay against direct loopback connections, measured in one run.

    python -m bench.relay_bench                 # about 2 s per figure
    python -m bench.relay_bench --seconds 1 --no-splice

Servers run in one child process, clients in another, the relay in this one (its own thread), so
that neither side competes for the relay's GIL. Each figure is measured twice, directly against the
server and through the relay, and printed with the ratio relay/direct:

  bulk TCP throughput over one connection; new connections per second (one request each);
  request latency p50/p99 with 1 and 64 concurrent persistent clients; UDP requests per second.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
from collections.abc import Callable
from typing import Any

from bench import relay_servers as rs
from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.relay.spec import ListenerSpec
from kproxy.model.service import Protocol


def _in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Run one client measurement in a fresh process and return its result."""
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1e6


def measure(direct: dict[str, int], relayed: dict[str, int], seconds: float) -> list[str]:
    rows = []
    for name, fn, unit, scale in (
        ("bulk TCP throughput", rs.bulk, "MB/s", 1e-6),
        ("new TCP connections", rs.connection_rate, "conn/s", 1.0),
    ):
        port = "sink" if fn is rs.bulk else "echo"
        d = _in_child(fn, direct[port], seconds) * scale
        r = _in_child(fn, relayed[port], seconds) * scale
        rows.append(f"{name:28} direct {d:10.1f}  relay {r:10.1f} {unit:7} ratio {r / d:5.2f}")
    for clients in (1, 64):
        d_lat = _in_child(rs.latencies, direct["echo"], clients, seconds)
        r_lat = _in_child(rs.latencies, relayed["echo"], clients, seconds)
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            d, r = _pct(d_lat, q), _pct(r_lat, q)
            rows.append(
                f"latency {label} {clients:2} clients      direct {d:10.1f}  relay {r:10.1f} "
                f"us      ratio {r / d:5.2f}  (+{r - d:.0f} us)"
            )
        rows.append(
            f"requests/s {clients:2} clients        direct {len(d_lat) / seconds:10.0f}  "
            f"relay {len(r_lat) / seconds:10.0f}         ratio "
            f"{len(r_lat) / max(1, len(d_lat)):5.2f}"
        )
    d = _in_child(rs.udp_rate, direct["udp"], seconds)
    r = _in_child(rs.udp_rate, relayed["udp"], seconds)
    rows.append(f"{'UDP requests':28} direct {d:10.0f}  relay {r:10.0f} req/s   ratio {r / d:5.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each figure")
    parser.add_argument("--no-splice", action="store_true", help="relay with recv/send copies")
    args = parser.parse_args(argv)
    ctx = mp.get_context("fork")
    ours, theirs = ctx.Pipe()
    servers = ctx.Process(target=rs.run_servers, args=(theirs,), daemon=True)
    servers.start()
    direct: dict[str, int] = ours.recv()
    relay = Relay(use_splice=not args.no_splice, udp_idle_timeout=5.0)
    relay.start()
    try:
        wanted = {
            name: ListenerSpec(
                Protocol.UDP if name == "udp" else Protocol.TCP, rs.HOST, 0, ((rs.HOST, port),)
            )
            for name, port in direct.items()
        }
        relayed = relay.sync(wanted).ports
        print(f"relay: splice={'no' if args.no_splice else 'yes'}, {args.seconds:g} s per figure")
        for row in measure(direct, {str(k): v for k, v in relayed.items()}, args.seconds):
            print(row)
        print("relay counters (bulk port):", relay.counters()["sink"])
    finally:
        relay.stop()
        servers.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
