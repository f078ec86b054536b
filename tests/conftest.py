"""Test-wide settings. Unit tests need no root and no kernel: the dataplane is FakeDataplane.

Hypothesis runs the `kproxy` profile (quick, for every run); `--hypothesis-profile=deep` runs
many more examples when hunting for a bug."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, settings

from kproxy.dataplane.base import TableReport
from kproxy.dataplane.nftables import node as nftables_node
from kproxy.dataplane.nftables import readback
from kproxy.dataplane.nftables.fake import FakeNfTables
from kproxy.sync import modes

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


class Leftovers:
    """The modes' leftover removals in unit tests: the real ones act on this process's network
    namespace, so each place's removal in the registry is replaced. A node holds nothing of
    another mode until a test puts a removal under a place's name (`legacy`, `iptables-nft`,
    `nftables`: sync/modes.py's LeftoverPlace.where)."""

    def __init__(self) -> None:
        self.removals: dict[str, Callable[[], Sequence[TableReport]]] = {}

    def stand_in(self, where: str) -> Callable[[float], Sequence[TableReport]]:
        return lambda lock_timeout: self.removals.get(where, list)()


@pytest.fixture(autouse=True)
def leftovers(monkeypatch: pytest.MonkeyPatch) -> Leftovers:
    fake = Leftovers()
    places: dict[str, modes.LeftoverPlace] = {}
    for name, mode in list(modes.MODES.items()):
        stand_ins = tuple(
            places.setdefault(p.where, modes.LeftoverPlace(p.where, fake.stand_in(p.where)))
            for p in mode.leftovers
        )
        monkeypatch.setitem(modes.MODES, name, dataclasses.replace(mode, leftovers=stand_ins))
    return fake
