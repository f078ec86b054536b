"""A table the kernel does not hold yet is written in stages (kproxy/dataplane/nftables/staged.py):
everything but the base chains first, in several transactions, then the base chains. The result
must be the table one transaction writes, and a stage the kernel refuses must leave no table."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path

from integration.netns import Namespace, nft_listing
from integration.nftables.test_nftables_oracle import REPO
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.nftables.ir import Chain, Key, Lookup, Rule
from kproxy.plan.nftables.planner import NftablesPlan, NftablesPlanner

BYSTANDER = """table inet bystander {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t}
}
"""


def _plan(services: int = 12) -> NftablesPlan:
    ports: dict[ServicePortName, ServicePort] = {}
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i in range(services):
        name = ServicePortName(NamespacedName("ns", f"svc{i}"), "", Protocol.TCP)
        ports[name] = ServicePort(name=name, cluster_ips=(f"10.96.0.{i + 1}",), port=80)
        endpoints[name] = tuple(Endpoint(f"10.1.{i}.{j + 1}", 8080) for j in range(3))
    return NftablesPlanner(ProxyConfig(cluster_cidrs=("10.0.0.0/8",))).plan(
        ports, endpoints, NodeInfo("node-a"), (4,)
    )


def _write(
    ns: Namespace, plan: NftablesPlan, tmp: Path, stage: int
) -> subprocess.CompletedProcess[str]:
    path = tmp / f"plan-{ns.name}.pickle"
    path.write_bytes(pickle.dumps(plan))
    return subprocess.run(
        ns.argv(sys.executable, "-m", "integration.nft_write", str(path), str(stage)),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_table_written_in_stages_is_the_table_one_transaction_writes(
    namespaces: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    staged, whole = namespaces
    plan = _plan()

    in_stages = _write(staged, plan, tmp_path, stage=7)
    at_once = _write(whole, plan, tmp_path, stage=10**9)

    assert in_stages.returncode == 0 and at_once.returncode == 0, in_stages.stderr + at_once.stderr
    assert json.loads(in_stages.stdout)["transactions"] > 10  # many stages, then the base chains
    assert json.loads(at_once.stdout)["transactions"] == 2  # one stage, then the base chains
    assert nft_listing(staged, "ip") == nft_listing(whole, "ip")


def test_a_refused_stage_leaves_no_table_and_touches_no_other(
    namespaces: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    ns = namespaces[0]
    ns.run("nft", "-f", "-", input=BYSTANDER)
    plan = _plan()
    table = plan.kernel[4]
    # A last chain the kernel refuses (a lookup in a set that does not exist): its stage comes
    # after the stages that created the table, its sets and most of its chains.
    broken = Chain("zz-refused", (Rule((Lookup((Key.SADDR,), "no-such-set"),)),))
    plan = dataclasses.replace(
        plan, kernel={4: dataclasses.replace(table, chains=(*table.chains, broken))}
    )

    result = _write(ns, plan, tmp_path, stage=7)

    assert result.returncode == 3, result.stdout + result.stderr
    assert "refused" in result.stderr
    tables = ns.run("nft", "list", "tables").stdout
    assert "kube-proxy" not in tables
    assert ns.run("nft", "list", "table", "inet", "bystander").stdout == BYSTANDER
