"""ServiceCIDRs through the watch, in the nftables mode, with real traffic: as upstream, a new
connection to an address of a ServiceCIDR that no Service holds is dropped (an unknown port of a
ClusterIP is rejected), a ClusterIP that is allocated works, a ServiceCIDR added or changed in the
API reaches the rules without a restart, and with none in the API there is no range to check (the
address is routed as any other: here to a host that owns it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.agent_harness import AgentNode, agent_node, slice_object, wait_until
from integration.manifests import service_manifest
from integration.traffic import start_server

VIP = "10.96.5.10"
PORT = 80
TARGET = 8080
# An address in the ServiceCIDR no Service holds, owned by a host beyond the node: reachable
# while nothing checks the range.
STRANGER_IP = "10.96.0.99"


def service_cidr(*cidrs: str) -> dict[str, object]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes"},
        "spec": {"cidrs": list(cidrs)},
    }


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AgentNode]:
    with agent_node("svccidr", tmp_path, mode="nftables") as built:
        yield built


def test_service_cidrs_from_the_watch_decide_unallocated_addresses(node: AgentNode) -> None:
    web = node.backend("web-a", "192.168.1.10", TARGET)
    client = node.client("client", "192.168.9.9")
    stranger = node.topo.add_outside("stranger", STRANGER_IP, "10.96.0.1")
    start_server(node.topo, stranger, "stranger", PORT, "tcp")
    node.api.create("Service", service_manifest("web", VIP, PORT, TARGET))
    node.api.create("EndpointSlice", slice_object("web", [web.ip], TARGET))
    node.start_agent()

    def outcomes(target: str, port: int = PORT) -> dict[str, int]:
        return node.probe(client, target, port, 2)

    # No ServiceCIDR in the API: upstream's fallback, nothing but unknown ports is checked.
    assert wait_until(lambda: outcomes(VIP) == {"web-a": 2}, 15)
    assert outcomes(STRANGER_IP) == {"stranger": 2}
    assert outcomes(VIP, 81) == {"refused": 2}

    node.api.create("ServiceCIDR", service_cidr("10.96.0.0/16"))
    assert wait_until(lambda: outcomes(STRANGER_IP) == {"timeout": 2}, 15), "not dropped"
    assert outcomes(VIP) == {"web-a": 2}
    assert outcomes(VIP, 81) == {"refused": 2}

    # The range changes: the address is no longer in it.
    node.api.update("ServiceCIDR", service_cidr("10.97.0.0/16"))
    assert wait_until(lambda: outcomes(STRANGER_IP) == {"stranger": 2}, 15), "still dropped"
    assert outcomes(VIP) == {"web-a": 2}
    assert len(node.agents) == 1 and node.agents[0].proc.poll() is None
