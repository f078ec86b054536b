"""What ships: the wheel holds every module of the package, and the tests run that wheel.

The wheel is built as the Dockerfile builds it (`pip wheel` of the project directory) from a copy
of the tracked files only, as a clean checkout would have them, so nothing left in the work tree
(a build/ directory, an untracked module) can hide a module that a user's install would miss."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import kproxy

ROOT = Path(__file__).resolve().parents[2]


def _tracked(*patterns: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in out.split("\0") if name]


def _tracked_modules() -> set[str]:
    return {name for name in _tracked("kproxy") if name.endswith(".py")}


def test_the_wheel_holds_every_tracked_module(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    for name in _tracked("kproxy", "setup.cfg", "pyproject.toml", "README.md"):
        target = checkout / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), "."],
        cwd=checkout,
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("kproxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".py")}
    tracked = _tracked_modules()
    assert tracked - shipped == set(), "tracked modules the wheel leaves out"
    assert shipped - tracked == set(), "modules in the wheel that are not tracked"


def test_the_tests_run_the_installed_package() -> None:
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(kproxy.__file__ or "").resolve().is_relative_to(purelib)
    installed = {str(f) for f in importlib.metadata.files("kproxy") or () if str(f).endswith(".py")}
    assert _tracked_modules() - installed == set(), "tracked modules missing from the install"


@pytest.mark.parametrize("mode", ["iptables", "userspace", "nftables"])
def test_the_installed_command_plans_every_mode(mode: str, tmp_path: Path) -> None:
    """`kproxy dump --manifests` of the demo's scenario through the installed script: every mode's
    planner and renderer load from the wheel."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        f"kind: KubeProxyConfiguration\nmode: {mode}\n"
    )
    kproxy_script = Path(sys.executable).parent / "kproxy"
    proc = subprocess.run(
        [
            str(kproxy_script),
            "dump",
            "--manifests",
            str(ROOT / "integration" / "scenarios" / "demo"),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kube-dns" in proc.stdout
