"""Where `kproxy sync --once --manifests` keeps its memory, step by step (tracemalloc).

    python -m bench.memory_profile --services 10000 --mode iptables

Writes bench/once_bench.py's manifests, then runs the CLI's own `sync --once` in this process
(in a fresh network namespace: `unshare -n`) with tracemalloc on, and at each step prints the
process's RSS, its peak so far (VmHWM), the memory Python objects hold (tracemalloc) and the
biggest holders by allocating line. python-iptables' and the kernel's memory is outside tracemalloc:
it shows as RSS beyond the traced figure. Figures are slower than the real run (tracemalloc).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.once_bench import NODE, write_inputs

STARTED = time.monotonic()


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def checkpoint(step: str, top: int) -> None:
    if not tracemalloc.is_tracing():
        seconds = time.monotonic() - STARTED
        print(
            f"-- {step}: RSS {_status('VmRSS'):.0f} MB, peak RSS {_status('VmHWM'):.0f} MB"
            f" (at {seconds:.2f} s)"
        )
        return
    current, peak = tracemalloc.get_traced_memory()
    print(
        f"\n-- {step}: RSS {_status('VmRSS'):.0f} MB, peak RSS {_status('VmHWM'):.0f} MB;"
        f" traced {current / 2**20:.0f} MB (peak {peak / 2**20:.0f} MB)",
        flush=True,
    )
    stats = tracemalloc.take_snapshot().statistics("lineno")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        where = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
        print(f"   {stat.size / 2**20:7.1f} MB {stat.count:9d} blocks  {where}", flush=True)


def wrap(owner: Any, name: str, step: str, top: int, after: bool = False) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not after:
            checkpoint(f"before {step}", top)
        result = original(*args, **kwargs)
        if after:
            checkpoint(f"after {step}", top)
        return result

    setattr(owner, name, wrapped)


def inner(workdir: Path, mode: str, top: int, trace: bool) -> None:
    from kproxy import cli
    from kproxy.dataplane.xtables import table_writer
    from kproxy.inspect import inputs
    from kproxy.sync import loop

    if trace:
        tracemalloc.start()
    wrap(inputs, "read_manifests", "reading manifests (the parse)", top, after=True)
    wrap(inputs, "state_from_manifests", "conversion to cluster state", top, after=True)
    wrap(loop.SyncLoop, "plan", "plan", top)
    wrap(loop.SyncLoop, "apply", "apply (plan made)", top)
    wrap(table_writer.TableWriter, "write", "edit, compile and replace", top)
    wrap(table_writer, "replace_table", "replace", top)
    wrap(loop.SyncLoop, "apply", "apply", top, after=True)
    os.environ["XTABLES_LOCKFILE"] = str(workdir / "xtables.lock")
    argv = ["--log-level", "warning", "sync", "--once", "--manifests", str(workdir / "manifests")]
    argv += ["--hostname-override", NODE, "--config", str(workdir / f"{mode}.yaml")]
    try:
        cli.cli.main(argv, standalone_mode=False)
    finally:
        checkpoint("end", top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--mode", choices=("iptables", "nftables"), default="iptables")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument(
        "--rss-only", action="store_true", help="no tracemalloc: RSS and peak RSS at each step"
    )
    parser.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.inner, args.mode, args.top, not args.rss_only)
        return
    with tempfile.TemporaryDirectory(prefix="kproxy-mem-") as tmp:
        write_inputs(Path(tmp), args.services, args.endpoints)
        argv = ["unshare", "-n", sys.executable, "-m", "bench.memory_profile"]
        argv += ["--mode", args.mode, "--top", str(args.top), "--inner", tmp]
        argv += ["--rss-only"] if args.rss_only else []
        subprocess.run(argv, check=True)


if __name__ == "__main__":
    main()
