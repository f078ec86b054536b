"""Each mode's own metrics, under upstream's names for it: the nftables mode's sync and cleanup
failure counters, and the rules gauges per table of the mode's own tables (the iptables mode's
`filter` and `nat`, the nftables mode's `kube-proxy`), against the faithful fakes."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.leftovers import LeftoverRemoval
from kproxy.dataplane.nftables.fake import FakeNfTables
from kproxy.dataplane.nftables.node import NftablesNode
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.state.ingest import upsert
from kproxy.sync.loop import StateBox, SyncLoop
from kproxy.sync.modes import MODES
from tests.sync.test_mode_leftovers import Removal
from tests.sync.test_sync_loop import endpoint_slice, service

NFT_SYNC_FAILURES = "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"
NFT_CLEANUP_FAILURES = "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total"
IPT_FAILURES = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
IPT_RULES = "kubeproxy_sync_proxy_rules_iptables_total"
NFT_RULES = "kproxy_sync_proxy_rules_nftables_total"


def sample(loop: SyncLoop, name: str, labels: dict[str, str] | None = None) -> float | None:
    return loop.metrics.registry.get_sample_value(name, labels or {})


@pytest.fixture
def cleanup() -> Removal:
    """The nftables mode's cleanup after its first commit (removing the iptables mode's
    chains)."""
    return Removal()


@pytest.fixture
def nft_loop(nft: FakeNfTables, cleanup: Removal) -> Iterator[SyncLoop]:
    config = ProxyConfig(mode="nftables")
    metrics = ProxyMetrics()
    health = ProxyHealth(timeout=60.0)
    box = StateBox("node-a", health, metrics)
    node = NftablesNode(nft.socket(), (4,))
    box.apply(upsert(Kind.SERVICE, service("web", "10.96.0.5")))
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.1", "10.0.0.2"])))
    yield SyncLoop(
        box, config, MODES["nftables"], node, metrics, health, leftovers=[LeftoverRemoval(cleanup)]
    )
    node.close()


def iptables_loop() -> SyncLoop:
    config = ProxyConfig()
    metrics = ProxyMetrics()
    health = ProxyHealth(timeout=60.0)
    box = StateBox("node-a", health, metrics)
    node = IptablesNode({4: FakeDataplane()}, write_sysctls=lambda sysctls: None)
    box.apply(upsert(Kind.SERVICE, service("web", "10.96.0.5")))
    box.apply(upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.1"])))
    return SyncLoop(box, config, MODES["iptables"], node, metrics, health)


def test_nftables_mode_counts_a_failed_sync_under_upstreams_name(
    nft: FakeNfTables, nft_loop: SyncLoop
) -> None:
    assert sample(nft_loop, NFT_SYNC_FAILURES) == 0  # exported from the start
    assert sample(nft_loop, NFT_CLEANUP_FAILURES) == 0
    nft.refuse_commit(errno.ENOMEM)
    assert not nft_loop.sync()
    assert sample(nft_loop, NFT_SYNC_FAILURES) == 1
    assert nft_loop.sync()
    assert sample(nft_loop, NFT_SYNC_FAILURES) == 1
    # As upstream's nftables mode: none of the iptables mode's series.
    assert sample(nft_loop, IPT_FAILURES) is None
    assert sample(nft_loop, IPT_RULES, {"table": "nat"}) is None


def test_nftables_rules_total_counts_the_kube_proxy_table(nft_loop: SyncLoop) -> None:
    outcome = nft_loop.sync()
    assert outcome is not None
    rules = outcome.plan.stats.rules["kube-proxy"]
    assert rules > 0
    assert sample(nft_loop, NFT_RULES, {"table": "kube-proxy"}) == rules
    written = sample(nft_loop, "kproxy_sync_proxy_rules_nftables_last", {"table": "kube-proxy"})
    assert written == outcome.result.rules_written > 0


def test_a_failed_cleanup_is_counted_does_not_fail_the_sync_and_is_retried(
    nft_loop: SyncLoop, cleanup: Removal
) -> None:
    cleanup.fail = True
    assert nft_loop.sync()  # kproxy's table is in: the sync did its work
    assert sample(nft_loop, NFT_CLEANUP_FAILURES) == 1
    assert sample(nft_loop, NFT_SYNC_FAILURES) == 0
    cleanup.fail = False
    assert nft_loop.sync()
    assert cleanup.calls == 2
    assert sample(nft_loop, NFT_CLEANUP_FAILURES) == 1
    assert nft_loop.sync()
    assert cleanup.calls == 2  # done: not run again


def test_iptables_mode_keeps_its_names_and_tables() -> None:
    loop = iptables_loop()
    outcome = loop.sync()
    assert outcome is not None
    assert sample(loop, IPT_RULES, {"table": "nat"}) == outcome.plan.stats.rules["nat"] > 0
    assert sample(loop, IPT_RULES, {"table": "filter"}) == outcome.plan.stats.rules["filter"]
    assert sample(loop, IPT_FAILURES) == 0
    assert sample(loop, NFT_SYNC_FAILURES) is None
    assert sample(loop, NFT_RULES, {"table": "kube-proxy"}) is None
