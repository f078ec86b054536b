"""`kproxy run --cleanup` (kube-proxy's `--cleanup`) on a node holding an upstream kube-proxy
ruleset: every kube-proxy chain and jump goes, everything else stays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kproxy.rules.saved import parse_save

UPSTREAM = Path(__file__).resolve().parents[1] / "scenarios" / "upstream-kube-proxy.rules"
KEPT = {
    "CNI-FORWARD",
    "CNI-HOSTPORT-DNAT",
    "KUBE-FIREWALL",
    "KUBE-IPTABLES-HINT",
    "KUBE-KUBELET-CANARY",
}


def test_run_cleanup_removes_upstream_kube_proxy_rules_and_nothing_else(tmp_path: Path) -> None:
    kproxy = Path(sys.executable).with_name("kproxy")
    script = (
        f"iptables-legacy-restore < {UPSTREAM} && iptables-legacy-save > {tmp_path}/before && "
        f"{kproxy} run --cleanup && iptables-legacy-save > {tmp_path}/after"
    )
    env = {**os.environ, "XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", script],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    before = parse_save((tmp_path / "before").read_text())
    after = parse_save((tmp_path / "after").read_text())
    assert any(c.startswith("KUBE-SVC-") for c in before["nat"].chains)  # there was work to do
    for name, table in after.items():
        leftover = {c for c in table.chains if c.startswith("KUBE-")} - KEPT
        assert not leftover, (name, leftover)
        for lines in table.chains.values():
            for line in lines:
                assert "-j KUBE-SERVICES" not in line and "-j KUBE-POSTROUTING" not in line
                assert "-j KUBE-NODEPORTS" not in line, line
    # Other programs' rules are untouched.
    for name, table in before.items():
        for chain in KEPT & set(table.chains):
            assert after[name].chains[chain] == table.chains[chain]
        for chain in ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"):
            foreign = [line for line in table.chains.get(chain, []) if "KUBE-" not in line]
            assert foreign == [
                line for line in after[name].chains.get(chain, []) if "KUBE-" not in line
            ]
    assert "removed" in proc.stdout
