"""How long `kproxy --help` and `kproxy dump --manifests integration/scenarios/demo` take, from
exec to exit, as a user types them: the installed script of this venv, the median of N runs.

Baselines measured in the same run, interleaved with the commands so that the machine's load
falls on all alike: `python -c pass` from the same venv (the interpreter's own start-up), and,
with --old-ref, the same commands from another git ref (a temporary `git worktree` whose source
the same interpreter imports) beside this tree's source imported the same way. Prints seconds,
ratios, and which heavy libraries each command loaded; a row "no rich" runs the command as the
image has it, without the dev-only `rich`.

    .venv/bin/python -m bench.cli_startup --runs 21 --old-ref main
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "integration" / "scenarios" / "demo"
COMMANDS = {
    "--help": ["--help"],
    "dump --manifests": ["dump", "--manifests", str(SCENARIO), "--hostname-override", "node-1"],
}
HEAVY = ("kubernetes", "pyroute2", "iptc", "prometheus_client", "structlog", "rich", "asyncio")
# Runs the CLI as the installed script does, from whatever `kproxy` the path finds first (run
# with -P, so that the current directory, perhaps this repository, is not on the path).
RUN_CLI = "import sys; from kproxy.cli import main; sys.argv[0] = 'kproxy'; sys.exit(main())"
# The image installs no dev tools, so no `rich` (import-linter's), which structlog loads when it
# finds it: this venv has it, so one row hides it to show what a node's start-up costs.
WITHOUT_RICH = "import sys; sys.modules['rich'] = None; " + RUN_CLI.removeprefix("import sys; ")


def _elapsed(argv: Sequence[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def _loaded(argv: Sequence[str], env: dict[str, str]) -> list[str]:
    """The heavy top-level packages the command imported (from -X importtime's report)."""
    rest = argv[1:] if argv[0] == sys.executable else argv  # the script runs under the same python
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *rest],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    names = set()
    for line in proc.stderr.splitlines():
        _, cumulative, name = line.split("|") if line.count("|") == 2 else ("", "", "")
        if cumulative.strip().isdigit() and int(cumulative) > 50:  # a refused import takes ~0
            names.add(name.strip())
    return [h for h in HEAVY if h in names]


@contextlib.contextmanager
def _old_tree(ref: str) -> Iterator[Path]:
    """The source of `ref` in a temporary git worktree, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kproxy-startup-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(tree), ref],
            check=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False
            )


def _cases(old: Path | None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Name -> (argv, environment). The installed script runs with the environment as it is."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KPROXY_CONFIG")}
    script = str(Path(sys.executable).with_name("kproxy"))
    cases = {"python -c pass": ([sys.executable, "-c", "pass"], env)}
    for name, args in COMMANDS.items():
        cases[f"kproxy {name}"] = ([script, *args], env)
        cases[f"kproxy {name}, no rich"] = ([sys.executable, "-P", "-c", WITHOUT_RICH, *args], env)
        if old is not None:  # both from a source tree, so that they import alike
            for tree, label in ((REPO, "this tree:"), (old, "old ref:")):
                tree_env = {**env, "PYTHONPATH": str(tree)}
                argv = [sys.executable, "-P", "-c", RUN_CLI, *args]
                cases[f"{label} kproxy {name}"] = (argv, tree_env)
    return cases


def measure(runs: int, old: Path | None) -> None:
    cases = _cases(old)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for argv, env in cases.values():  # warm-up: page cache, __pycache__ of the old tree
        _elapsed(argv, env)
    for _ in range(runs):
        for name, (argv, env) in cases.items():
            times[name].append(_elapsed(argv, env))
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["python -c pass"]
    print(f"{runs} runs each, interleaved; median seconds from exec to exit")
    print(f"{'command':34} {'median':>8} {'min':>7}  {'x python -c pass':>16}  loads")
    for name, (argv, env) in cases.items():
        loads = "" if name == "python -c pass" else ", ".join(_loaded(argv, env)) or "-"
        ratio = median[name] / base
        print(f"{name:34} {median[name]:8.3f} {min(times[name]):7.3f}  {ratio:16.1f}  {loads}")
    if old is not None:
        for name in COMMANDS:
            new_s, old_s = median[f"this tree: kproxy {name}"], median[f"old ref: kproxy {name}"]
            print(f"kproxy {name}: this tree takes {new_s / old_s:.2f} x the old ref's time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--old-ref", help="a git ref to compare with (e.g. main)")
    args = parser.parse_args()
    if args.old_ref is None:
        measure(args.runs, None)
        return
    with _old_tree(args.old_ref) as tree:
        measure(args.runs, tree)


if __name__ == "__main__":
    main()
