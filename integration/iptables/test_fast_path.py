"""The template fast path builds exactly the entries python-iptables builds, for a few hundred
random clusters per family, and the kernel reads them back as planned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", [4, 6])
def test_fast_path_entries_equal_python_iptables_entries(family: int, tmp_path: Path) -> None:
    env = {**os.environ, "XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}
    proc = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            "-m",
            "integration.fast_path_check",
            "--family",
            str(family),
            "--examples",
            "150",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    compared = int(proc.stdout.split()[1])
    assert compared > 1000, proc.stdout
