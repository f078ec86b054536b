"""Other programs' nf_tables objects and kproxy's nftables mode.

Another program's commit to another table costs kproxy no read of its own table; one to
kproxy's table is read back and repaired at the next sync (kproxy's monitor of nf_tables'
change notifications, kproxy/dataplane/nftables/node.py). On a node with iptables-nft's chains in
the `ip` and `ip6` families beside kproxy's tables (kubelet's, a CNI's) and a firewall's `inet`
table, every read of kproxy's table finds only kproxy's chains: syncs, a restart and repairs
work, and the other programs' objects stay exactly as they were."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.agent_harness import (
    HEALTHZ_PORT,
    Agent,
    AgentNode,
    agent_node,
    slice_object,
    wait_until,
)
from integration.conftest import Cluster
from integration.manifests import service_manifest
from integration.netns import Namespace, nft_listing
from integration.nft_foreign import foreign_tables
from integration.nftables.test_nftables_staged import REPO, _plan


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


# --- other programs' chains in kproxy's families (iptables-nft's, as on nearly every node)

DEMO = Path(__file__).parents[1] / "scenarios" / "demo"
VIP, PORT, TARGET = "10.96.0.10", 80, 8080


def _flush_kproxy_chains(ns: Namespace) -> None:
    """Another program empties a chain of kproxy's in each family: only a read of the kernel
    and a repair bring its rules back."""
    for family in ("ip", "ip6"):
        ns.run("nft", "flush", "chain", family, "kube-proxy", "services")


def _kproxy_tables(ns: Namespace) -> list[list[Any]]:
    return [nft_listing(ns, family) for family in ("ip", "ip6")]


def _assert_node_chains(tables: dict[str, str]) -> None:
    """The node's seeded chains (real_node.py) are there to compare: either family's made
    kproxy's reads of its own table go wrong."""
    for family in ("ip", "ip6"):
        assert "KUBE-FIREWALL" in tables[f"{family} filter"], tables
        assert "KUBE-IPTABLES-HINT" in tables[f"{family} mangle"], tables
    assert "cali-FORWARD" in tables["ip filter"], tables
    assert "CNI-HOSTPORT-DNAT" in tables["ip nat"], tables
    assert "hook input" in tables["inet firewalld"], tables


@pytest.mark.parametrize("proxy_mode", ["nftables"], indirect=True)
def test_syncs_on_a_node_with_iptables_nft_chains_leave_them_alone(cluster: Cluster) -> None:
    ns = cluster.node
    for path in DEMO.glob("*.yaml"):
        shutil.copy(path, cluster.manifests / path.name)
    before = foreign_tables(ns)
    _assert_node_chains(before)

    cluster.sync()
    written = _kproxy_tables(ns)
    # A new process reads the kernel's table: it finds only kproxy's chains in it.
    assert "no changes" in cluster.sync()
    _flush_kproxy_chains(ns)
    assert "no changes" not in cluster.sync()  # the repair

    assert _kproxy_tables(ns) == written
    # What `dump --diff` reads of the live table (readback.py) is kproxy's table alone too.
    cluster.kproxy("dump", "--diff", "--manifests", str(cluster.manifests), *cluster.config_args())
    assert foreign_tables(ns) == before


@pytest.fixture
def agent_node_nft(tmp_path: Path) -> Iterator[AgentNode]:
    with agent_node("nftnode", tmp_path, mode="nftables") as built:
        yield built


def _first_sync_failures(agent: Agent) -> list[Any]:
    """Wait for the agent's first sync to complete or fail; the failures' events."""

    def either() -> bool:
        return bool(agent.events("sync_completed") or agent.events("sync_failed"))

    assert wait_until(either, 60), agent.log_tail()
    return agent.events("sync_failed")


def test_agent_restart_and_repair_on_a_node_with_iptables_nft_chains(
    agent_node_nft: AgentNode,
) -> None:
    node = agent_node_nft
    before = foreign_tables(node.node)
    _assert_node_chains(before)
    web = node.backend("web-a", "192.168.1.10", TARGET)
    client = node.client("client", "192.168.9.9")
    node.api.create("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.create("EndpointSlice", slice_object("web", [web.ip], TARGET))
    first = node.start_agent()
    assert wait_until(lambda: node.probe(client, VIP, PORT, 5) == {"web-a": 5}, 15)
    written = _kproxy_tables(node.node)
    assert first.terminate() == 0, first.log_tail()

    agent = node.start_agent(wait=False)
    assert not _first_sync_failures(agent), agent.log_tail()  # a restart reads the kernel
    assert node.http_get(HEALTHZ_PORT, "/livez")[0] == 200

    _flush_kproxy_chains(node.node)
    assert wait_until(lambda: agent.events("table_repaired"), 15), agent.log_tail()
    assert wait_until(lambda: _kproxy_tables(node.node) == written, 15), agent.log_tail()
    assert not agent.events("sync_failed"), agent.log_tail()
    assert node.http_get(HEALTHZ_PORT, "/livez")[0] == 200
    assert node.probe(client, VIP, PORT, 5) == {"web-a": 5}
    assert foreign_tables(node.node) == before
