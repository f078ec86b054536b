"""What kproxy leaves in the node's tables: stable across syncs, dumpable, and fully removable."""

from __future__ import annotations

import re

from integration.conftest import Cluster
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
# kubelet creates KUBE-FIREWALL too, so upstream's `kube-proxy --cleanup` leaves it, as kproxy does.
# kubelet's (real_node.py seeds them in the backend the iptables mode writes).
KUBELET_CHAINS = {"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"}


def _two_services(cluster: Cluster) -> None:
    """A balanced TCP service with affinity, and a UDP service without endpoints."""
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    cluster.service("web", VIP, PORT, backends, TARGET, affinity=True)
    cluster.service("empty", "10.96.100.11", 53, [], 53, protocol="UDP")
    cluster.configure(cluster_cidr="192.168.0.0/16")


def _add_foreign_rules(cluster: Cluster) -> None:
    """Rules some other program owns, in both tables kproxy writes."""
    for table in ("filter", "nat"):
        cluster.iptables("-t", table, "-N", "TEST-KEEP")
        cluster.iptables("-t", table, "-A", "TEST-KEEP", "-s", "10.99.0.0/16", "-j", "RETURN")
    cluster.iptables("-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "TEST-KEEP")
    cluster.iptables("-t", "nat", "-I", "POSTROUTING", "1", "-j", "TEST-KEEP")


def _kube_chains(saved: str) -> set[str]:
    return set(re.findall(r"\bKUBE-[A-Z0-9-]+", saved))


def _foreign_lines(saved: str) -> list[str]:
    return [line for line in saved.splitlines() if "TEST-KEEP" in line]


def test_second_sync_changes_nothing(cluster: Cluster) -> None:
    _two_services(cluster)
    client = cluster.pod("client", "192.168.9.9")
    first = cluster.sync()
    # Traffic in between: it fills conntrack and the affinity lists, which must not matter.
    assert probe(client.ns, VIP, PORT, "tcp", count=5).answered == 5
    before = cluster.save()

    second = cluster.sync()

    assert "no changes" not in first, first
    assert "no changes" in second, second
    assert cluster.save() == before


def test_cleanup_removes_every_kube_chain_and_keeps_foreign_rules(cluster: Cluster) -> None:
    _two_services(cluster)
    _add_foreign_rules(cluster)
    cluster.sync()
    synced = cluster.save()
    assert "KUBE-SVC-" in synced and "KUBE-SEP-" in synced

    cluster.kproxy("cleanup")
    cleaned = cluster.save()

    assert _kube_chains(cleaned) <= KUBELET_CHAINS, cleaned
    assert _foreign_lines(cleaned) == _foreign_lines(synced), cleaned
    cluster.kproxy("cleanup")  # nothing left to do is not an error
    assert cluster.save() == cleaned


def test_live_dump_is_accepted_by_iptables_restore(cluster: Cluster) -> None:
    _two_services(cluster)
    _add_foreign_rules(cluster)
    cluster.sync()

    dump = cluster.kproxy("dump")
    check = cluster.node.run("iptables-legacy-restore", "--test", input=dump, check=False)

    assert check.returncode == 0, f"{check.stderr}\n--- dump:\n{dump}"
    assert "KUBE-SVC-" in dump and "DNAT" in dump and "REJECT" in dump, dump
    assert "TEST-KEEP" not in dump, "dump should print only kproxy's part of the tables"


def test_dump_of_manifests_equals_the_live_dump_after_a_sync(cluster: Cluster) -> None:
    """README's debugging recipe: what `dump --manifests` predicts is what the node then holds."""
    _two_services(cluster)
    cluster.sync()
    args = ["--manifests", str(cluster.manifests), "--hostname-override", "node-1"]
    args += ["--config", str(cluster.config_file)]
    for family in ("4", "6"):
        predicted = cluster.kproxy("dump", "--family", family, *args)
        live = cluster.kproxy("dump", "--family", family)
        # KUBE-FIREWALL is kubelet's too (its IPv6 one, and its jumps, which were there before
        # kproxy's and so stay below them): the rest must be as predicted, line for line.
        assert _without_kubelets(live) == _without_kubelets(predicted), family


def _without_kubelets(dump: str) -> list[str]:
    return sorted(line for line in dump.splitlines() if "KUBE-FIREWALL" not in line)
