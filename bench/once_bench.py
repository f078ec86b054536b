"""`kproxy sync --once --manifests` as a whole process against `iptables-legacy-restore`.

    python -m bench.once_bench --services 10000                      # both modes
    python -m bench.once_bench --services 5000 --endpoints 50 --mode nftables

N ClusterIP services with E endpoints each are written as manifests (one YAML file of Services
and EndpointSlices, as `kubectl get -o yaml` prints them). Each round runs, in a fresh network
namespace (`unshare -n`) of its own:

  - kproxy: `kproxy sync --once --manifests DIR` in the given mode, the whole process (start,
    manifest parse, plan, write, exit), wall time and peak RSS (`wait4`);
  - the baseline: `iptables-legacy-restore --noflush` of the equivalent iptables table (what
    upstream's iptables mode writes at that size), in another namespace.

Rounds alternate kproxy and baseline, so both see the same machine load; the figures are each
one's best and worst of the rounds, the ratio best/best.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.sync_bench import build_state, endpoint_ip, service_ip
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.plan.iptables.ruleset import plan_ruleset
from kproxy.rules.render import render_table

NODE = "bench-node"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def manifests(services: int, endpoints: int) -> list[dict[str, Any]]:
    """The Services and EndpointSlices of bench/sync_bench.py's cluster, as manifests."""
    docs: list[dict[str, Any]] = []
    for i in range(services):
        name = f"svc-{i}"
        port = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "bench"},
                "spec": {
                    "clusterIP": service_ip(i),
                    "clusterIPs": [service_ip(i)],
                    "ipFamilies": ["IPv4"],
                    "ports": [port],
                    "type": "ClusterIP",
                },
            }
        )
        eps = [
            {
                "addresses": [endpoint_ip(i, j)],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": "other",
            }
            for j in range(endpoints)
        ]
        docs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "addressType": "IPv4",
                "metadata": {
                    "name": f"{name}-abcde",
                    "namespace": "bench",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "endpoints": eps,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }
        )
    return docs


def write_inputs(workdir: Path, services: int, endpoints: int) -> None:
    (workdir / "manifests").mkdir()
    with open(workdir / "manifests" / "cluster.yaml", "w") as f:
        yaml.dump_all(manifests(services, endpoints), f, Dumper=_DUMPER)
    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    state = build_state(services, endpoints)
    ruleset = plan_ruleset(state.services_map(), state.endpoints_map(), NodeInfo(NODE), config)
    (workdir / "iptables.rules").write_text(
        "".join(render_table(t) for t in ruleset.ruleset.tables)
    )
    for mode in ("iptables", "nftables"):
        doc = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": mode,
            "clusterCIDR": "10.128.0.0/10",
            **({"iptablesBackend": "legacy"} if mode == "iptables" else {}),
        }
        (workdir / f"{mode}.yaml").write_text(yaml.safe_dump(doc))


def timed_child(
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: Path | None = None,
) -> dict[str, float]:
    """Wall seconds, CPU seconds (user and system: the kernel's work on its writes included)
    and peak RSS (MB) of `argv`, run to completion (its output discarded). On a loaded machine
    the CPU seconds are the steadier figure."""
    with open(stdin or os.devnull, "rb") as given:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=given, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert proc.stderr is not None
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        took = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"seconds": took, "cpu": cpu, "rss_mb": usage.ru_maxrss / 1024}


def run_kproxy(workdir: Path, mode: str, source: Path | None = None) -> dict[str, float]:
    """In a fresh namespace (the caller's `unshare -n`): one `kproxy sync --once`, of the
    installed kproxy or (`source`) of the kproxy package in that source tree."""
    env = {**os.environ, "XTABLES_LOCKFILE": str(workdir / "xtables.lock")}
    if source is None:
        argv = [str(Path(sys.executable).parent / "kproxy")]
    else:
        argv = [sys.executable, "-c", "from kproxy.cli import main; main()"]
        env["PYTHONPATH"] = str(source)
    argv += ["--log-level", "warning", "sync", "--once"]
    argv += ["--manifests", str(workdir / "manifests"), "--hostname-override", NODE]
    argv += ["--config", str(workdir / f"{mode}.yaml")]
    return timed_child(argv, env, cwd=source)


def run_baseline(workdir: Path) -> dict[str, float]:
    """In a fresh namespace: `iptables-legacy-restore --noflush` of the whole table."""
    env = {**os.environ, "XTABLES_LOCKFILE": str(workdir / "xtables.lock")}
    argv = ["iptables-legacy-restore", "-w", "5", "--noflush"]
    return timed_child(argv, env, stdin=workdir / "iptables.rules")


def in_netns(*args: str) -> dict[str, float]:
    argv = ["unshare", "-n", sys.executable, "-m", "bench.once_bench", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def measure(
    services: int, endpoints: int, modes: list[str], rounds: int, before: Path | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="kproxy-once-") as tmp:
        workdir = Path(tmp)
        write_inputs(workdir, services, endpoints)
        for mode in modes:
            mine: list[dict[str, float]] = []
            old: list[dict[str, float]] = []
            base: list[dict[str, float]] = []
            for _ in range(rounds):
                if before is not None:
                    args = ("--inner", mode, "--workdir", tmp, "--before", str(before))
                    old.append(in_netns(*args))
                mine.append(in_netns("--inner", mode, "--workdir", tmp))
                base.append(in_netns("--inner", "baseline", "--workdir", tmp))
            if old:
                report(mode, services, endpoints, old, base, f"before ({before})")
            report(mode, services, endpoints, mine, base)


# Issue 22's targets: (mode, services, endpoints) -> (sync --once / restore, peak RSS MB).
TARGETS = {
    ("iptables", 10000, 5): ("<= 1.0x", "<= 250 MB"),
    ("nftables", 10000, 5): ("<= 1.0x", "<= 300 MB"),
    ("nftables", 50000, 5): ("<= 0.35x", "<= 700 MB"),
    ("nftables", 5000, 50): ("under 10 s", "-"),
}


def report(
    mode: str,
    services: int,
    endpoints: int,
    mine: list[dict[str, float]],
    base: list[dict[str, float]],
    which: str = "",
) -> None:
    """One table for the mode: each figure as best-worst of the rounds, the ratio best/best."""
    k = sorted(r["seconds"] for r in mine)
    b = sorted(r["seconds"] for r in base)
    kc = sorted(r["cpu"] for r in mine)
    bc = sorted(r["cpu"] for r in base)
    rss = sorted(r["rss_mb"] for r in mine)
    time_target, rss_target = TARGETS.get((mode, services, endpoints), ("-", "-"))
    print(f"\n{mode} mode, {services} services x {endpoints} endpoints, {len(k)} rounds {which}")
    print("| | kproxy | iptables-legacy-restore | ratio | target |")
    print("|---|---|---|---|---|")
    print(
        f"| `sync --once --manifests` (whole process) vs a full restore | {k[0]:.2f}-{k[-1]:.2f} s"
        f" | {b[0]:.2f}-{b[-1]:.2f} s | {k[0] / b[0]:.2f}x | {time_target} |"
    )
    print(
        f"| the same, CPU seconds (user + system) | {kc[0]:.2f}-{kc[-1]:.2f} s"
        f" | {bc[0]:.2f}-{bc[-1]:.2f} s | {kc[0] / bc[0]:.2f}x | |"
    )
    print(f"| peak RSS of the process | {rss[0]:.0f}-{rss[-1]:.0f} MB | | | {rss_target} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--mode", choices=("iptables", "nftables", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--inner", choices=("iptables", "nftables", "baseline"))
    parser.add_argument(
        "--before", type=Path, help="a source tree of kproxy to measure too, in the same rounds"
    )
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        if args.inner == "baseline":
            print(json.dumps(run_baseline(args.workdir)))
        else:
            print(json.dumps(run_kproxy(args.workdir, args.inner, args.before)))
        return
    modes = ["iptables", "nftables"] if args.mode == "both" else [args.mode]
    measure(args.services, args.endpoints, modes, args.rounds, args.before)


if __name__ == "__main__":
    main()
