"""The legacy backend's own table writer against the kernel (integration/table_writer_check.py
runs each case in a fresh network namespace of its own, one address family per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case", ["roundtrip", "survive", "unlocked", "refusals", "proof"])
def test_table_writer(case: str, family: int, tmp_path: Path) -> None:
    env = {**os.environ, "XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}
    argv = [sys.executable, "-m", "integration.table_writer_check"]
    proc = subprocess.run(
        ["unshare", "-n", *argv, "--family", str(family), "--case", case],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{case} passed" in proc.stdout
