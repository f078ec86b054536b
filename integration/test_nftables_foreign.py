"""Another program's commit to another table costs kproxy no read of its own table; one to
kproxy's table is read back and repaired at the next sync (kproxy's monitor of nf_tables'
change notifications, kproxy/dataplane/nftables/node.py)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

from integration.netns import Namespace
from integration.test_nftables_staged import REPO, _plan


def test_only_a_change_to_kproxys_own_table_is_read_back(
    namespaces: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    ns = namespaces[0]
    path = tmp_path / "plan.pickle"
    path.write_bytes(pickle.dumps(_plan()))

    out = subprocess.run(
        ns.argv(sys.executable, "-m", "integration.nft_foreign", str(path)),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    steps = {s["step"]: s for s in map(json.loads, _json_lines(out))}

    assert steps["first"]["read"]  # a new process reads what the kernel holds
    assert not steps["quiet"]["read"] and not steps["quiet"]["wrote"]
    assert not steps["other table"]["read"], "another table's commit made kproxy read its own"
    assert steps["kproxy's table"]["read"]
    assert steps["kproxy's table"]["wrote"] == ["services"]  # the foreign rule is gone again
    assert not steps["after the repair"]["read"]
    assert "drop" not in ns.run("nft", "list", "chain", "ip", "kube-proxy", "services").stdout


def _json_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("{")]  # not kproxy's logs
