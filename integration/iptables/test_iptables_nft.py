"""The iptables mode on iptables-nft nodes and on legacy ones: with its default config kproxy
writes the backend kubelet uses (real_node.py seeds kubelet's KUBE-IPTABLES-HINT in one), traffic
flows, a second sync changes nothing, `cleanup` leaves kubelet's chains, and on nf_tables a
one-service change rewrites only that service's chains. Each test runs on both kinds of node."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import Cluster
from integration.iptables_backend import iptables_tool, save_tool
from integration.netns import topology
from integration.traffic import probe

VIP = "10.96.100.10"
VIP2 = "10.96.100.20"
PORT = 80
TARGET = 8080
CLIENT = "192.168.9.9"
OTHER = {"nft": "legacy", "legacy": "nft"}


@pytest.fixture(params=["nft", "legacy"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A simulated node whose kubelet and CNI write through iptables-nft, or through legacy."""
    with topology("nft", kubelet=request.param) as topo:
        yield Cluster(topo, tmp_path)


def nat(cluster: Cluster, backend: str, family: int = 4) -> str:
    return cluster.node.run(save_tool(backend, family), "-t", "nat").stdout


def handles(cluster: Cluster, chain: str) -> list[str]:
    """The nf_tables handles of a chain's rules: a rule that is rewritten gets a new one."""
    listing = cluster.node.run("nft", "-a", "list", "chain", "ip", "nat", chain).stdout
    rules = [line for line in listing.splitlines() if not line.strip().startswith("chain ")]
    return re.findall(r"# handle (\d+)", "\n".join(rules))


def svc_chain(text: str, vip: str) -> str:
    found = re.search(rf"-d {re.escape(vip)}/32 .* -j (KUBE-SVC-\w+)", text)
    assert found, text
    return found.group(1)


def test_sync_writes_where_kubelet_does_and_cleanup_leaves_kubelets(node: Cluster) -> None:
    backend = node.iptables_backend
    backends = [node.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = node.pod("client", CLIENT)
    node.service("web", VIP, PORT, backends, TARGET)

    first = node.sync()
    rules = nat(node, backend)
    assert ":KUBE-SERVICES" in rules and ":KUBE-SVC-" in rules and ":KUBE-SEP-" in rules, rules
    assert "--probability 0.50000000000" in rules and '"default/web:p -> ' in rules, rules
    assert "KUBE-SERVICES" not in nat(node, OTHER[backend]), first
    result = probe(client.ns, VIP, PORT, "tcp", count=40)
    assert result.failed == 0 and set(result.answers) == {"web-1", "web-2"}, result
    assert "no changes" in node.sync()
    dumped = node.kproxy("dump")
    assert ":KUBE-SERVICES" in dumped and "-j KUBE-SVC-" in dumped, dumped

    removed = node.kproxy("cleanup")
    assert not removed.startswith("removed 0 chains"), removed
    for family in (4, 6):
        for save in (save_tool(backend, family), save_tool(OTHER[backend], family)):
            left = node.node.run(save).stdout
            assert "KUBE-SERVICES" not in left and "KUBE-SVC-" not in left, left
    # kubelet's and the CNI's chains are compared with what was seeded as the topology closes.


def test_nft_node_round_trips_through_iptables_nft_restore(node: Cluster) -> None:
    backend = node.iptables_backend
    backends = [node.backend("web-1", "192.168.1.10", TARGET)]
    node.service("web", VIP, PORT, backends, TARGET, node_port=30080)
    node.sync()
    before = node.save()

    saved = node.node.run(save_tool(backend)).stdout
    restore = f"{iptables_tool(backend)}-restore"
    node.node.run(restore, input=saved, env={"XTABLES_LOCKFILE": str(node.lock_file)})

    assert node.save() == before
    assert "no changes" in node.sync()


def test_one_service_change_rewrites_only_its_chains(node: Cluster) -> None:
    web = [node.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = node.pod("client", CLIENT)
    node.service("web", VIP, PORT, web, TARGET)
    node.service("api", VIP2, PORT, web, TARGET)
    node.sync()

    node.service("web", VIP, PORT, web[:1], TARGET)  # one endpoint fewer
    summary = node.sync()

    assert "wrote 1 chain " in summary and "removed 1 chain," in summary, summary
    result = probe(client.ns, VIP, PORT, "tcp", count=20)
    assert set(result.answers) == {"web-1"}, result
    if node.iptables_backend == "nft":
        rules = nat(node, "nft")
        api, web_chain = svc_chain(rules, VIP2), svc_chain(rules, VIP)
        kept = {c: handles(node, c) for c in ("KUBE-SERVICES", api)}
        node.service("web", VIP, PORT, web, TARGET)
        node.sync()
        assert {c: handles(node, c) for c in kept} == kept  # untouched rules keep their handle
        assert len(handles(node, web_chain)) == 2  # one rule per endpoint, rewritten


def test_flushed_chain_and_deleted_jump_are_repaired(node: Cluster) -> None:
    web = [node.backend("web-1", "192.168.1.10", TARGET)]
    client = node.pod("client", CLIENT)
    node.service("web", VIP, PORT, web, TARGET)
    node.sync()
    good = node.save()
    chain = svc_chain(nat(node, node.iptables_backend), VIP)

    node.iptables("-t", "nat", "-F", chain)
    node.iptables("-t", "nat", "-D", "PREROUTING", *_services_jump())
    assert probe(client.ns, VIP, PORT, "tcp", count=3).failed == 3
    summary = node.sync()

    assert "no changes" not in summary, summary
    assert node.save() == good
    assert probe(client.ns, VIP, PORT, "tcp", count=5).failed == 0


def _services_jump() -> list[str]:
    return ["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]


def test_concurrent_iptables_writer_loses_nothing(node: Cluster) -> None:
    """Another program adds rules through the node's iptables while kproxy syncs changes."""
    web = [node.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2, 3)]
    tool = iptables_tool(node.iptables_backend)
    env = {"XTABLES_LOCKFILE": str(node.lock_file)}
    node.node.run(tool, "-w", "-N", "WRITER-TEST", env=env)
    count, errors = 60, []

    def write() -> None:
        for i in range(count):
            rule = ["-A", "WRITER-TEST", "-s", f"10.9.0.{i}", "-j", "RETURN"]
            proc = subprocess.run(
                node.node.argv(tool, "-w", *rule),
                capture_output=True,
                text=True,
                env={**os.environ, **env},
                check=False,
            )
            if proc.returncode:
                errors.append(proc.stderr)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for n in range(6):
            node.service("web", VIP, PORT, web[: 1 + n % 3], TARGET)
            node.sync()
    finally:
        writer.join()

    listed = node.node.run(tool, "-S", "WRITER-TEST").stdout
    assert not errors and listed.count("-j RETURN") == count, (errors, listed)
    node.node.run(tool, "-w", "-F", "WRITER-TEST", env=env)
    node.node.run(tool, "-w", "-X", "WRITER-TEST", env=env)
    assert "no changes" in node.sync()


def test_mode_switch_to_nftables_and_back(node: Cluster) -> None:
    backend = node.iptables_backend
    web = [node.backend("web-1", "192.168.1.10", TARGET)]
    client = node.pod("client", CLIENT)
    node.service("web", VIP, PORT, web, TARGET)
    node.sync()

    node.mode = "nftables"
    node.configure()
    switched = node.sync()
    assert "KUBE-SERVICES" not in nat(node, backend), switched
    assert "kube-proxy" in node.node.run("nft", "list", "tables").stdout
    assert probe(client.ns, VIP, PORT, "tcp", count=5).failed == 0

    node.mode = "iptables"
    node.configure()
    back = node.sync()
    assert "KUBE-SERVICES" in nat(node, backend), back
    assert "kube-proxy" not in node.node.run("nft", "list", "tables").stdout
    assert probe(client.ns, VIP, PORT, "tcp", count=5).failed == 0


def test_override_then_auto_moves_the_rules_to_kubelets_backend(node: Cluster) -> None:
    backend = node.iptables_backend
    web = [node.backend("web-1", "192.168.1.10", TARGET)]
    client = node.pod("client", CLIENT)
    node.service("web", VIP, PORT, web, TARGET)
    args = ["sync", "--once", "--manifests", str(node.manifests), "--hostname-override", "node-1"]

    node.kproxy(*args, "--iptables-backend", OTHER[backend])
    assert "KUBE-SERVICES" in nat(node, OTHER[backend])
    assert "KUBE-SERVICES" not in nat(node, backend)
    node.sync()  # auto: kubelet's backend; the other one's chains go once these are in

    assert "KUBE-SERVICES" in nat(node, backend)
    assert "KUBE-SERVICES" not in nat(node, OTHER[backend])
    assert probe(client.ns, VIP, PORT, "tcp", count=5).failed == 0


def test_trace_and_diff_read_the_backend_in_use(node: Cluster) -> None:
    web = [node.backend("web-1", "192.168.1.10", TARGET)]
    node.pod("client", CLIENT)
    node.service("web", VIP, PORT, web, TARGET)
    node.sync()

    traced = node.kproxy("trace", "tcp", f"{VIP}:{PORT}", "--from", CLIENT)
    assert "192.168.1.10:8080" in traced, traced
    diff = run_diff(node)
    assert diff.returncode == 0 and not diff.stdout.strip(), diff.stdout
    node.iptables("-t", "nat", "-F", svc_chain(nat(node, node.iptables_backend), VIP))
    assert run_diff(node).returncode == 1


def run_diff(node: Cluster) -> subprocess.CompletedProcess[str]:
    from integration.netns import run_kproxy

    return run_kproxy(
        node.node,
        "dump",
        "--diff",
        "--manifests",
        str(node.manifests),
        "--hostname-override",
        "node-1",
        lock_file=node.lock_file,
        check=False,
    )
