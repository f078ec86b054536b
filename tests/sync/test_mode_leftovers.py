"""The other modes' leftovers, removed by the sync loop after a mode's first commit (each other
mode's removal from the registry, sync/modes.py), against the dataplane fakes: what they removed
counts in the sync's summary (`sync --once`'s line, the `sync_completed` log, /statusz), and a
removal that fails is retried after the next sync in every mode, without failing the sync whose
own rules are in."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import structlog

from kproxy.dataplane.base import ModeDataplane, TableReport
from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.nftables.fake import FakeNfTables
from kproxy.dataplane.nftables.node import NftablesNode, NftTableChanges
from kproxy.dataplane.relay.relay import Relay
from kproxy.dataplane.userspace.node import UserspaceNode
from kproxy.dataplane.xtables.diff import TableChanges
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.errors import DataplaneError
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import upsert
from kproxy.sync.loop import StateBox, SyncLoop
from kproxy.sync.modes import MODES, other_modes_leftovers
from kproxy.sync.once import once_loop, sync_once
from kproxy.sync.status import SyncStatus
from tests.conftest import Leftovers
from tests.sync.test_sync_loop import endpoint_slice, service

NFT_CLEANUP_FAILURES = "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total"


def cluster_state() -> ClusterState:
    state = ClusterState()
    for kind, obj in (
        (Kind.SERVICE, service("web", "10.96.0.5")),
        (Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.1", "10.0.0.2"])),
        (Kind.SERVICE, service("db", "10.96.0.6")),
        (Kind.ENDPOINT_SLICE, endpoint_slice("db", ["10.0.0.3"])),
    ):
        list(upsert(kind, obj)(state))
    return state


def once(mode: str, dataplane: ModeDataplane) -> tuple[str, SyncLoop]:
    """`sync --once` in `mode` over the same two services: its summary line, and its loop."""
    config = ProxyConfig(mode=mode)
    loop = once_loop(cluster_state(), NodeInfo(name="node-a"), config, MODES[mode], dataplane)
    return sync_once(loop).summary(), loop


def agent_loop(mode: str, dataplane: ModeDataplane) -> SyncLoop:
    """The agent's loop (metrics, /statusz) over the same services."""
    config, metrics = ProxyConfig(mode=mode), ProxyMetrics()
    health = ProxyHealth(timeout=60.0)
    box = StateBox("node-a", health, metrics)
    box.state = cluster_state()
    box.state.node = NodeInfo(name="node-a")
    status = SyncStatus(mode, (4,))
    leftovers = other_modes_leftovers(MODES[mode], 5.0)
    return SyncLoop(
        box, config, MODES[mode], dataplane, metrics, health, status=status, leftovers=leftovers
    )


class Removal:
    """Another mode's leftover removal: fails while `fail` is set, else returns `removed`."""

    def __init__(self, removed: Sequence[TableReport] = ()) -> None:
        self.removed = list(removed)
        self.fail = False
        self.calls = 0

    def __call__(self) -> list[TableReport]:
        self.calls += 1
        if self.fail:
            raise DataplaneError("xtables lock: resource temporarily unavailable")
        return self.removed


@pytest.fixture
def relay() -> Iterator[Relay]:
    relay = Relay()
    relay.start()
    yield relay
    relay.stop()


def no_sysctls(sysctls: object) -> None:
    pass


def kube_chains(dataplane: FakeDataplane) -> int:
    """The iptables mode's chains (KUBE-FIREWALL is kubelet's: it stays)."""
    return sum(
        name.startswith("KUBE-") and name != "KUBE-FIREWALL"
        for table in dataplane.read().values()
        for name in table.chains
    )


# The nftables mode's tables, as the other modes' removal reports them.
NFT_TABLE = NftTableChanges("ip kube-proxy", delete=["nat-prerouting", "nat-output", "services"])


def test_switching_to_nftables_counts_the_iptables_chains_removed(
    nft: FakeNfTables, leftovers: Leftovers
) -> None:
    legacy = FakeDataplane()
    once("iptables", IptablesNode({4: legacy}, no_sysctls))
    chains = kube_chains(legacy)
    assert chains > 5
    # What the x_tables modes' removal does (xtables/families.py), on the fake's tables.
    leftovers.removals["legacy"] = lambda: legacy.cleanup().tables
    node = NftablesNode(nft.socket(), (4,))
    try:
        with structlog.testing.capture_logs() as logs:
            summary, _ = once("nftables", node)
    finally:
        node.close()
    assert kube_chains(legacy) == 0
    assert f"removed {chains} chains ({chains} of another mode)" in summary, summary
    done = next(entry for entry in logs if entry["event"] == "sync_completed")
    assert done["chains_removed"] == chains


def test_the_iptables_mode_counts_the_nftables_chains_removed_in_its_status(
    leftovers: Leftovers,
) -> None:
    leftovers.removals["nftables"] = Removal([NFT_TABLE])
    loop = agent_loop("iptables", IptablesNode({4: FakeDataplane()}, no_sysctls))
    outcome = loop.sync()
    assert outcome is not None
    assert outcome.result.chains_removed == 3
    assert loop.status is not None
    assert loop.status.body({}, 60.0)["lastSync"]["chainsRemoved"] == 3


def test_leftovers_alone_are_a_change_in_the_summary(leftovers: Leftovers) -> None:
    """A restarted agent whose own rules are in, on a node that still holds the other mode's."""
    legacy = FakeDataplane()
    once("iptables", IptablesNode({4: legacy}, no_sysctls))
    leftovers.removals["nftables"] = Removal([NFT_TABLE])
    summary, _ = once("iptables", IptablesNode({4: legacy}, no_sysctls))
    assert "wrote 0 chains (0 rules), removed 3 chains (3 of another mode)" in summary, summary


def make_node(mode: str, nft: FakeNfTables, relay: Relay) -> ModeDataplane:
    if mode == "iptables":
        return IptablesNode({4: FakeDataplane()}, no_sysctls)
    if mode == "nftables":
        return NftablesNode(nft.socket(), (4,))
    return UserspaceNode({4: FakeDataplane()}, {4: relay}, write_sysctls=no_sysctls)


@pytest.mark.parametrize("mode", ["iptables", "nftables", "userspace"])
def test_a_failed_removal_fails_no_sync_and_is_retried_after_the_next(
    mode: str, nft: FakeNfTables, relay: Relay, leftovers: Leftovers
) -> None:
    removal = Removal([NFT_TABLE])
    removal.fail = True
    # One place another mode left rules in (the others hold nothing).
    leftovers.removals[{"nftables": "legacy"}.get(mode, "nftables")] = removal
    loop = agent_loop(mode, make_node(mode, nft, relay))
    first = loop.sync()
    assert first is not None  # the mode's own rules are in: the sync did its work
    assert first.result.cleanup_failures == 1
    assert first.result.chains_removed == 0
    removal.fail = False
    second = loop.sync()
    assert second is not None
    assert removal.calls == 2
    assert second.result.cleanup_failures == 0
    assert second.result.chains_removed == 3  # counted in the sync that removed them
    third = loop.sync()
    assert third is not None
    assert removal.calls == 2  # done: never run again
    assert third.result.chains_removed == 0
    if mode == "nftables":  # upstream's counter, in the mode that has it
        failures = loop.metrics.registry.get_sample_value(NFT_CLEANUP_FAILURES)
        assert failures == 1


def test_a_switch_counts_the_other_modes_removals_through_the_registry(
    nft: FakeNfTables, leftovers: Leftovers
) -> None:
    """No dataplane removes another mode's rules: the loop runs each other mode's removal from
    the registry after the first commit, and the summary counts what it removed (38 chains of
    the iptables mode here, never "removed 0 chains")."""
    chains = [f"KUBE-SEP-{i:016d}" for i in range(36)] + ["KUBE-SERVICES", "KUBE-NODEPORTS"]
    leftovers.removals["legacy"] = lambda: [TableChanges("nat", delete=chains)]
    node = NftablesNode(nft.socket(), (4,))
    try:
        summary, _ = once("nftables", node)
    finally:
        node.close()
    assert "removed 38 chains (38 of another mode)" in summary, summary
    summary, _ = once("iptables", IptablesNode({4: FakeDataplane()}, no_sysctls))
    assert "of another mode" not in summary, summary  # its own removal is never run
