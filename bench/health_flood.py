"""The agent's health server while a host off the node holds many idle connections to it.

    python -m bench.health_flood --connections 10000
    python -m bench.health_flood --connections 300 --nofile 128

A node namespace runs `kproxy run` (one Service); the `outside` namespace runs integration/flood.py,
which holds COUNT half-sent requests to the node's :10256 and opens again each one the agent
closes. Measured first without the flood (the baseline), then during it: `/livez` on the node's
loopback and `/healthz` from off the node (median and worst of `--probes` each), the agent's
threads and RSS. `--nofile` cuts the agent's open-file limit (prlimit) before the flood, and the
run reports whether the agent lived, its EMFILE count and whether a later change was programmed.
Ratios are flood / baseline. Needs root; everything lives in namespaces removed on exit.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

from integration.agent_harness import (
    HEALTHZ_PORT,
    METRICS_PORT,
    AgentNode,
    agent_node,
    slice_object,
    wait_for_nat,
)
from integration.hostile import get, proc_status, start_flood, threads, timed_get
from integration.manifests import service_manifest
from integration.netns import NODE_IP, stop

VIP = "10.96.0.10"


def probe(node: AgentNode, count: int) -> dict[str, float]:
    """Median and worst seconds of /livez (loopback) and /healthz (off node); non-200 counted."""
    livez, healthz, bad = [], [], 0
    for _ in range(count):
        code, seconds = timed_get(node, node.node, "127.0.0.1", HEALTHZ_PORT, "/livez")
        livez.append(seconds)
        bad += code != 200
        code, seconds = timed_get(node, node.topo.outside, NODE_IP, HEALTHZ_PORT, "/healthz")
        healthz.append(seconds)
        bad += code != 200
        time.sleep(0.1)
    return {
        "livez_p50": statistics.median(livez),
        "livez_max": max(livez),
        "healthz_p50": statistics.median(healthz),
        "healthz_max": max(healthz),
        "not_200": bad,
    }


def emfile_count(node: AgentNode) -> float:
    _, text = get(node, node.node, "127.0.0.1", METRICS_PORT, "/metrics")
    prefix = 'kproxy_http_accept_errors_total{error="EMFILE",server="healthz"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def run(connections: int, probes: int, nofile: int | None) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="kproxy-bench-") as workdir,
        agent_node("flood", Path(workdir)) as node,
    ):
        node.api.apply("Service", service_manifest("web", VIP, 80, 8080))
        node.api.apply("EndpointSlice", slice_object("web", ["192.168.1.10"], 8080))
        agent = node.start_agent()
        if nofile:
            resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
        base = probe(node, probes)
        base_threads, base_rss = threads(agent.pid), proc_status(agent.pid)["VmRSS"]
        flood, connected = start_flood(node, HEALTHZ_PORT, connections)
        try:
            node.api.apply("EndpointSlice", slice_object("web", ["192.168.1.11"], 8080))
            during = probe(node, probes)
            flood_threads, flood_rss = threads(agent.pid), proc_status(agent.pid)["VmRSS"]
            alive = agent.proc.poll() is None
        finally:
            stop(flood)
        programmed = wait_for_nat(node, node.dnat_to("192.168.1.11", 8080), timeout=30)
        print(f"flood: {connections} connections from off the node, {connected}")
        print(f"agent threads {base_threads} -> {flood_threads}; RSS {base_rss} -> {flood_rss}")
        for key in ("livez_p50", "livez_max", "healthz_p50", "healthz_max"):
            ratio = during[key] / base[key] if base[key] else float("inf")
            print(
                f"{key:12} {base[key] * 1000:7.1f} ms -> {during[key] * 1000:7.1f} ms {ratio:5.1f}x"
            )
        print(f"answers other than 200: {base['not_200']:.0f} -> {during['not_200']:.0f}")
        print(
            f"agent alive during the flood: {alive}; change programmed after it: {programmed}; "
            f"EMFILE in accept: {emfile_count(node):.0f}; failed syncs: "
            f"{len(agent.events('sync_failed'))}"
            + (f" (open-file limit {nofile})" if nofile else "")
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--nofile", type=int, default=None, help="the agent's open-file limit")
    args = parser.parse_args(argv)
    run(args.connections, args.probes, args.nofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
