"""`kproxy sync --once` refuses clearly when it cannot work, and then writes nothing."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from integration.conftest import both_modes

MANIFEST = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
"""
CONFIG = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


def _kproxy(
    args: list[str], env: dict[str, str], prefix: list[str]
) -> subprocess.CompletedProcess[str]:
    # `unshare -n`: a private, empty network namespace for each run, so nothing touches the host.
    return subprocess.run(
        ["unshare", "-n", *prefix, sys.executable, "-m", "kproxy.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}


@both_modes
def test_not_root_is_refused(tmp_path: Path, proxy_mode: str) -> None:
    # pytest's tmp_path is private to root; the unprivileged user needs readable files.
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:
        Path(shared).chmod(0o755)
        manifest = Path(shared) / "m.yaml"
        manifest.write_text(MANIFEST)
        config = Path(shared) / "config.yaml"
        config.write_text(f"{CONFIG}mode: {proxy_mode}\n")
        for path in (manifest, config):
            path.chmod(0o644)
        proc = _kproxy(
            ["sync", "--once", "--manifests", str(manifest), "--config", str(config)],
            _env(tmp_path),
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        )
    assert proc.returncode == 1, proc.stderr
    assert "must run as root" in proc.stderr


# The iptables mode's legacy backend only: the nftables mode and iptables-nft take no xtables
# lock (one transaction per table, serialized by the kernel).
def test_lock_held_too_long_is_refused_and_nothing_written(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    env = _env(tmp_path)
    with open(env["XTABLES_LOCKFILE"], "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        script = (
            f"{sys.executable} -m kproxy.cli sync --once --manifests {manifest} "
            "--iptables-backend legacy --lock-timeout 0.5; echo rc=$?; iptables-legacy-save -t nat"
        )
        proc = subprocess.run(
            ["unshare", "-n", "sh", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    assert "rc=1" in proc.stdout
    assert "held" in proc.stderr and "xtables.lock" in proc.stderr
    assert "KUBE-" not in proc.stdout


# The iptables mode's legacy backend only: the nftables mode writes its table over netlink, and
# loads libiptc only to remove iptables-mode chains a node already has (none in this fresh
# namespace); a fresh namespace has no kubelet hint, so `auto` would pick nft.
def test_missing_libiptc_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    env = {**_env(tmp_path), "IPTABLES_LIBDIR": str(tmp_path), "XTABLES_LIBDIR": str(tmp_path)}
    # Point python-iptables at an empty directory for its libraries and extensions.
    args = ["sync", "--once", "--manifests", str(manifest), "--iptables-backend", "legacy"]
    proc = _kproxy(args, env, [])
    assert proc.returncode == 1
    assert "python-iptables could not build a rule" in proc.stderr
    assert "Traceback" not in proc.stderr
