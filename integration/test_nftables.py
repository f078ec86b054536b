"""The nftables mode with real traffic: one `kube-proxy` table per family, written over netlink.

Each test runs kproxy (`mode: nftables`) in its own node namespace; see conftest.py. The oracle
test checks the netlink writer against `nft -f` of the rendered text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import Cluster
from integration.netns import Namespace
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080


@pytest.fixture
def nft_cluster(cluster: Cluster) -> Iterator[Cluster]:
    cluster.mode = "nftables"
    yield cluster


def nft(ns: Namespace, *args: str) -> str:
    return ns.run("nft", *args).stdout


def nft_json(ns: Namespace, family: str = "ip") -> list[dict[str, object]]:
    """`nft -j list table FAMILY kube-proxy`, without handles (they differ between loads)."""
    doc = json.loads(nft(ns, "-j", "list", "table", family, "kube-proxy"))
    return [_without_handles(item) for item in doc["nftables"] if "metainfo" not in item]


def _without_handles(item: dict[str, object]) -> dict[str, object]:
    ((kind, body),) = item.items()
    assert isinstance(body, dict)
    clean = {k: v for k, v in body.items() if k != "handle"}
    if isinstance(clean.get("elem"), list):
        clean["elem"] = sorted(clean["elem"], key=json.dumps)
    return {kind: clean}


def test_clusterip_reaches_both_endpoints(nft_cluster: Cluster) -> None:
    backends = [nft_cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = nft_cluster.pod("client", "192.168.9.9")
    nft_cluster.service("web", VIP, PORT, backends, TARGET)
    nft_cluster.sync()

    result = probe(client.ns, VIP, PORT, "tcp", count=100)

    assert result.failed == 0, result
    assert set(result.answers) == {"web-1", "web-2"}
    assert "chain services" in nft(nft_cluster.node, "list", "table", "ip", "kube-proxy")
