"""ServiceCIDRs in the commands that read manifests or list the API once, in the nftables mode,
with real traffic: `sync --once --manifests` with a ServiceCIDR in the directory writes the drop
of unallocated addresses, and `dump --diff` after a sync (the agent's, from the API, or
`sync --once`'s) reads the same ServiceCIDRs and finds nothing to change (exit 0)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from integration.agent_harness import AgentNode, agent_node, node_object, slice_object
from integration.manifests import NODE_NAME, service_manifest
from integration.netns import Pod, kproxy_path
from integration.nftables.test_service_cidrs import PORT, STRANGER_IP, TARGET, VIP, service_cidr
from integration.traffic import start_server

DROP = "ip daddr 10.96.0.0/16 drop"
OBJECTS = {
    "Service": service_manifest("web", VIP, PORT, TARGET),
    "EndpointSlice": slice_object("web", ["192.168.1.10"], TARGET),
    "ServiceCIDR": service_cidr("10.96.0.0/16"),
}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AgentNode]:
    with agent_node("cidrcmd", tmp_path, mode="nftables") as built:
        yield built


def kproxy(node: AgentNode, *args: str) -> subprocess.CompletedProcess[str]:
    """A kproxy command in the node namespace as this node, with the agent's config."""
    env = {"XTABLES_LOCKFILE": str(node.lock_file), "NO_PROXY": "*", "no_proxy": "*"}
    env.update({name: "" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")})
    argv = [str(kproxy_path()), *args, "--hostname-override", NODE_NAME]
    return node.node.run(*argv, "--config", str(node.config_file), env=env, check=False)


def diff_from_api(node: AgentNode) -> subprocess.CompletedProcess[str]:
    return kproxy(node, "dump", "--diff", "--kubeconfig", str(node.kubeconfig))


def pods(node: AgentNode) -> Pod:
    """The endpoint, a host owning an unallocated address of the ServiceCIDR (reachable while
    nothing checks the range), and the client."""
    node.backend("web-a", "192.168.1.10", TARGET)
    stranger = node.topo.add_outside("stranger", STRANGER_IP, "10.96.0.1")
    start_server(node.topo, stranger, "stranger", PORT, "tcp")
    return node.client("client", "192.168.9.9")


def test_dump_diff_after_the_agents_sync_from_an_api_with_a_service_cidr_is_empty(
    node: AgentNode,
) -> None:
    client = pods(node)
    for kind, obj in OBJECTS.items():
        node.api.create(kind, obj)
    agent = node.start_agent()
    assert DROP in node.rules(), agent.log_tail()
    assert node.probe(client, STRANGER_IP, PORT, 2) == {"timeout": 2}
    assert node.probe(client, VIP, PORT, 2) == {"web-a": 2}
    diff = diff_from_api(node)
    assert (diff.returncode, diff.stdout) == (0, ""), diff.stdout + diff.stderr


def test_sync_once_with_a_service_cidr_in_the_directory_writes_the_drop(
    node: AgentNode, tmp_path: Path
) -> None:
    client = pods(node)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    docs = [*OBJECTS.values(), node_object()]
    (manifests / "cluster.yaml").write_text(yaml.safe_dump_all(docs))
    synced = kproxy(node, "sync", "--once", "--manifests", str(manifests))
    assert synced.returncode == 0, synced.stderr
    assert DROP in node.rules()
    assert node.probe(client, STRANGER_IP, PORT, 2) == {"timeout": 2}
    assert node.probe(client, VIP, PORT, 2) == {"web-a": 2}
    assert node.probe(client, VIP, PORT + 1, 2) == {"refused": 2}

    # Right after it, the same objects read back: from the manifests and from the API.
    diff = kproxy(node, "dump", "--diff", "--manifests", str(manifests))
    assert (diff.returncode, diff.stdout) == (0, ""), diff.stdout + diff.stderr
    for kind, obj in OBJECTS.items():
        node.api.create(kind, obj)
    diff = diff_from_api(node)
    assert (diff.returncode, diff.stdout) == (0, ""), diff.stdout + diff.stderr
