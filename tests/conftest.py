"""Test-wide settings. Unit tests need no root and no kernel: the dataplane is FakeDataplane.

Hypothesis runs the `kproxy` profile (quick, for every run); `--hypothesis-profile=deep` runs
many more examples when hunting for a bug."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from kproxy.dataplane.nftables import node as nftables_node
from kproxy.dataplane.nftables import readback
from kproxy.dataplane.nftables.fake import FakeNfTables

# Planning, applying and tracing a generated cluster takes a few milliseconds, sometimes more on
# a loaded machine: judge properties by their examples, not by a per-example deadline.
settings.register_profile(
    "kproxy", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", deadline=None, max_examples=2000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("kproxy")


@pytest.fixture
def nft(monkeypatch: pytest.MonkeyPatch) -> FakeNfTables:
    """A fake nf_tables (kproxy/dataplane/nftables/fake.py) that the nftables node's monitor
    listens to and its readback may read without root."""
    kernel = FakeNfTables()
    monkeypatch.setattr(nftables_node, "NftMonitor", kernel.monitor)
    monkeypatch.setattr(readback.os, "geteuid", lambda: 0)
    return kernel
