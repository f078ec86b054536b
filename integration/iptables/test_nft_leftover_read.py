"""The iptables mode's leftover check in the iptables-nft tables reads only the tables that exist:
reading one with iptables-nft-save dumps every chain of its family, the nftables mode's too (a
restarted dump from the first chain for every buffer: seconds at 5,000 x 50). The kernel is asked
first whether the table is there."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from integration.agent_harness import NetnsWorker
from integration.netns import Topology, topology
from kproxy.dataplane.xtables import nft_backend
from kproxy.dataplane.xtables.nft_generation import table_exists


@pytest.fixture
def node() -> Iterator[Topology]:
    with topology("nftleft", real_node=False) as topo:
        yield topo


def cleanup_reads(
    worker: NetnsWorker, monkeypatch: pytest.MonkeyPatch, family: int
) -> tuple[list[str], list[str]]:
    """The tables cleanup read with iptables-nft-save, and those it changed."""
    read: list[str] = []
    real = nft_backend._run

    def recording(argv: list[str], text: str | None = None) -> Any:
        if "save" in argv[0]:
            read.append(argv[argv.index("-t") + 1])
        return real(argv, text)

    monkeypatch.setattr(nft_backend, "_run", recording)
    result = worker.call(lambda: nft_backend.NftDataplane(family, 5).cleanup())
    return read, [t.table for t in result.tables if not t.empty]


def test_only_tables_that_exist_are_read(node: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    ns, worker = node.node, NetnsWorker(node.node.name)
    try:
        assert worker.call(lambda: table_exists(4, "nat")) is False
        # The nftables mode's own table, in the family iptables-nft reads.
        ns.run("nft", "add table ip kube-proxy; add chain ip kube-proxy services")
        assert cleanup_reads(worker, monkeypatch, 4) == ([], [])

        ns.run("iptables-nft", "-w", "-t", "nat", "-N", "KUBE-SERVICES")
        ns.run("ip6tables-nft", "-w", "-t", "filter", "-N", "KUBE-FORWARD")
        assert worker.call(lambda: table_exists(4, "nat")) is True
        assert worker.call(lambda: table_exists(4, "filter")) is False
        assert worker.call(lambda: table_exists(6, "filter")) is True
        assert cleanup_reads(worker, monkeypatch, 4) == (["nat"], ["nat"])
        assert cleanup_reads(worker, monkeypatch, 6) == (["filter"], ["filter"])
        saved = ns.run("iptables-nft-save", "-t", "nat").stdout
        assert "KUBE-SERVICES" not in saved
        # The nftables mode's table is not the iptables mode's leftover.
        assert "chain services" in ns.run("nft", "list", "table", "ip", "kube-proxy").stdout
    finally:
        worker.close()
