"""Switching a node between the iptables and the userspace mode in place, under a client that
never stops connecting: the new mode's rules replace the old one's in one commit per table, and
a stopping userspace agent first hands its portals over to iptables-mode rules, so not one
connection fails and no chain of the other mode is left behind. Between the iptables and the
nftables mode, the summary of the sync that switched counts the other mode's chains it removed."""

from __future__ import annotations

import re
import time

from integration.agent_harness import Poller, summarize
from integration.conftest import Cluster
from integration.netns import stop
from integration.traffic import probe
from integration.userspace.test_userspace import (
    PORT,
    TARGET,
    USERSPACE_CHAINS,
    VIP,
    userspace_proxy,
)


def test_iptables_to_userspace_to_iptables_fails_no_connection(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, backends, TARGET)
    cluster.sync()  # the iptables mode
    poller = Poller(client.ns.name, VIP, PORT, interval=0.005).start()
    try:
        time.sleep(1.0)
        with userspace_proxy(cluster) as proxy:  # iptables -> userspace
            time.sleep(1.5)
            during = cluster.node.run("iptables-legacy-save").stdout
            err = stop(proxy)  # SIGTERM: the portals are handed over, then the relay stops
        time.sleep(1.0)
        after_stop = cluster.node.run("iptables-legacy-save").stdout
        summary = cluster.sync()  # the iptables agent takes over the node
        time.sleep(1.0)
    finally:
        attempts = poller.stop()
    failed = [a for a in attempts if not a.ok]
    assert len(attempts) > 200 and not failed, (summarize(failed), err)
    assert {a.outcome for a in attempts} == {"web-1", "web-2"}
    assert all(chain in during for chain in USERSPACE_CHAINS) and "KUBE-SVC-" not in during
    for tables in (after_stop, cluster.node.run("iptables-legacy-save").stdout):
        assert not any(chain in tables for chain in USERSPACE_CHAINS), tables
    assert "KUBE-SVC-" in after_stop  # the hand-over's, in the legacy tables of the portals
    assert "KUBE-SVC-" in cluster.save()  # the iptables mode's, in its backend
    if cluster.iptables_backend == "legacy":  # the hand-over's rules are the mode's own
        assert "wrote 0 chains" in summary or "no changes" in summary, summary
    else:  # they move from the portals' legacy tables to iptables-nft, without a failure
        assert "of another mode" in summary, summary


def _legacy_chains(cluster: Cluster) -> int:
    """The iptables mode's chains, both families (kubelet's stay: KUBE-FIREWALL, its canary
    and hint chains, seeded in the backend the mode writes)."""
    kubelets = (":KUBE-FIREWALL ", ":KUBE-KUBELET-CANARY ", ":KUBE-IPTABLES-HINT ")
    return sum(
        line.startswith(":KUBE-") and not line.startswith(kubelets)
        for family in (4, 6)
        for line in cluster.save(family).splitlines()
    )


def _nftables_chains(cluster: Cluster) -> int:
    """The chains of the nftables mode's `kube-proxy` tables, both families."""
    tables = cluster.node.run("nft", "list", "tables").stdout.splitlines()
    return sum(
        len(re.findall(r"^\s*chain ", cluster.node.run("nft", "list", *line.split()).stdout, re.M))
        for line in tables
        if line.split()[-1] == "kube-proxy"
    )


def _of_another_mode(summary: str) -> int:
    found = re.search(r"removed (\d+) chains? \((\d+) of another mode\)", summary)
    assert found, summary
    return int(found.group(2))


def test_a_switch_counts_the_other_modes_chains_it_removed(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    cluster.service("web", VIP, PORT, backends, TARGET)
    cluster.sync()  # the iptables mode
    legacy = _legacy_chains(cluster)
    cluster.mode = "nftables"
    cluster.configure()
    to_nftables = cluster.sync()
    nftables = _nftables_chains(cluster)
    cluster.mode = "iptables"
    cluster.configure()
    to_iptables = cluster.sync()

    assert legacy > 5 and nftables > 5, (legacy, nftables)
    assert _of_another_mode(to_nftables) == legacy, to_nftables
    assert _of_another_mode(to_iptables) == nftables, to_iptables
    assert _nftables_chains(cluster) == 0
    assert "of another mode" not in cluster.sync()  # removed once, counted once


def test_the_userspace_mode_removes_the_nftables_modes_tables(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, backends, TARGET)
    cluster.mode = "nftables"
    cluster.configure()
    cluster.sync()
    before = _nftables_chains(cluster)
    with userspace_proxy(cluster):  # its summary is printed after its first sync's removal
        after = _nftables_chains(cluster)
        result = probe(client.ns, VIP, PORT, "tcp", count=20)
    assert before > 5 and after == 0, (before, after)
    assert result.failed == 0 and set(result.answers) == {"web-1", "web-2"}, result
