"""`kproxy connections` on a busy node: N TCP conntrack entries (a tenth to 100 services' VIPs,
the rest foreign), in a fresh network namespace (`unshare -n`), filled with `conntrack -R`.

Measured in the same run: `conntrack -L -p tcp` printing the whole TCP table (the baseline: what
an operator runs today, with no service names), and the command's work in one process: the
kernel's protocol-filtered dump read into flows, matched to the services, grouped and rendered.
The fastest of three runs of each.

    python -m bench.connections_bench [--entries 100000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.sync_bench import build_state, endpoint_ip, run_in_netns, service_ip
from integration.conntrack_load import FlowGroup, flow_commands

SERVICES = 100
REPEATS = 3


def load(entries: int) -> None:
    per = entries // 10 // SERVICES
    groups = [FlowGroup("tcp", service_ip(i), 80, endpoint_ip(i, 0), per) for i in range(SERVICES)]
    groups.append(FlowGroup("tcp", "198.51.100.7", 443, "198.51.100.7", entries - per * SERVICES))
    lines: list[str] = []
    for group in groups:
        lines += flow_commands(group, len(lines))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flows.txt"
        path.write_text("\n".join(lines) + "\n")
        subprocess.run(["conntrack", "-R", str(path)], check=True, capture_output=True)


def inner(entries: int) -> None:
    from kproxy.inspect.connections_cmd import live_connections, render_connections

    load(entries)
    state = build_state(SERVICES, 2)
    baseline = ours = float("inf")
    for _ in range(REPEATS):  # the fastest of each: the machine is shared
        started = time.perf_counter()
        subprocess.run(["conntrack", "-L", "-p", "tcp"], check=True, capture_output=True)
        baseline = min(baseline, time.perf_counter() - started)
        started = time.perf_counter()
        found = live_connections(state, ("172.31.0.2",), "iptables", (4,))
        text = render_connections(found, "iptables")
        ours = min(ours, time.perf_counter() - started)
    listed = len(found)
    print(
        json.dumps(
            {"baseline": baseline, "kproxy": ours, "listed": listed, "lines": text.count("\n")}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.entries)
        return
    script = f"{sys.executable} -m bench.connections_bench --inner --entries {args.entries}"
    f = run_in_netns(SERVICES, script)
    print(
        f"{args.entries} TCP entries, {int(f['listed'])} of them to {SERVICES} services' VIPs:\n"
        f"  conntrack -L -p tcp (whole table, no names): {f['baseline']:.2f} s\n"
        f"  kproxy connections (dump, match, group, render): {f['kproxy']:.2f} s "
        f"= {f['kproxy'] / f['baseline']:.2f}x the baseline"
    )


if __name__ == "__main__":
    main()
