"""The long-running agent (`kproxy run`) in the nftables mode: API changes reach traffic, and
another program's change to kproxy's table is repaired by the next (periodic) sync."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.agent_harness import AgentNode, agent_node, slice_object, wait_until
from integration.manifests import service_manifest

VIP = "10.96.0.10"
PORT = 80
TARGET = 8080


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AgentNode]:
    with agent_node("nftagent", tmp_path, mode="nftables") as built:
        yield built


def _table(node: AgentNode) -> list[Any]:
    out = node.node.run("nft", "-j", "list", "table", "ip", "kube-proxy", check=False)
    if out.returncode != 0:
        return []
    items = json.loads(out.stdout)["nftables"]
    return [
        {k: {f: v for f, v in body.items() if f != "handle"}}
        for item in items
        for k, body in item.items()
        if k != "metainfo"
    ]


def test_agent_follows_the_api_and_repairs_a_foreign_change(node: AgentNode) -> None:
    a = node.backend("web-a", "192.168.1.10", TARGET)
    b = node.backend("web-b", "192.168.2.10", TARGET)
    client = node.client("client", "192.168.9.9")
    node.start_agent()
    node.api.create("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.create("EndpointSlice", slice_object("web", [a.ip, b.ip], TARGET))
    assert wait_until(lambda: node.probe(client, VIP, PORT, 20).keys() == {"web-a", "web-b"}, 15)
    node.api.update("EndpointSlice", slice_object("web", [a.ip], TARGET))
    assert wait_until(lambda: node.probe(client, VIP, PORT, 20) == {"web-a": 20}, 15)
    time.sleep(0.5)
    written = _table(node)

    node.node.run("nft", "flush", "map", "ip", "kube-proxy", "service-ips")

    # Nothing changed in the cluster: the periodic sync (2 s) notices the moved generation.
    assert wait_until(lambda: _table(node) == written, 15), "the table was not repaired"
    assert node.probe(client, VIP, PORT, 10) == {"web-a": 10}
