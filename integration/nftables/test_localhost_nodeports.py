"""Localhost NodePorts in the nftables mode (KEP-6032): with the KubeProxyNFTablesLocalhostNodePorts
gate, a client on the node reaches a NodePort at 127.0.0.1 through the agent's relay, under the
NodePort's externalTrafficPolicy; without it, nothing answers there, as upstream. The agent runs
the nftables mode's default config plus the gate, against the test API server."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import yaml

from integration.agent_harness import (
    METRICS_PORT,
    AgentNode,
    agent_config,
    agent_node,
    slice_object,
    tcp_exchange,
    wait_until,
)
from integration.manifests import service_manifest

GATE = "KubeProxyNFTablesLocalhostNodePorts"
VIP = "10.96.0.20"
PORT = 80
TARGET = 8080
NODE_PORT = 30080


def _local(node: AgentNode) -> str:
    """One connection from the node namespace to 127.0.0.1:NODE_PORT: who answered, or how it
    failed (`refused`, `ConnectionResetError`)."""
    return node.worker(node.node).call(lambda: tcp_exchange("127.0.0.1", NODE_PORT, 2.0)).outcome


def _metric(node: AgentNode, name: str, **labels: str) -> float | None:
    status, text = node.http_get(METRICS_PORT, "/metrics")
    assert status == 200
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def _settles(check: Callable[[], bool]) -> bool:
    return bool(wait_until(check, 15))


def _start(node: AgentNode, gate: bool) -> None:
    extra = {"featureGates": {GATE: True}} if gate else None
    node.config_file.write_text(yaml.safe_dump(agent_config(mode="nftables", extra=extra)))
    node.start_agent()


def test_the_gate_serves_localhost_nodeports_under_the_traffic_policy(tmp_path: Path) -> None:
    with agent_node("lhnp", tmp_path, mode="nftables") as node:
        web = node.backend("web-a", "192.168.1.10", TARGET)
        _start(node, gate=True)
        node.api.create("Service", service_manifest("web", VIP, PORT, TARGET, node_port=NODE_PORT))
        node.api.create("EndpointSlice", slice_object("web", [web.ip], TARGET))
        assert _settles(lambda: _local(node) == "web-a"), _local(node)
        assert (
            _metric(node, "kubeproxy_nftables_localhost_nodeport_listeners", ip_family="IPv4") == 1
        )

        # externalTrafficPolicy Local with the only endpoint on another node: reset, counted.
        local = service_manifest(
            "web", VIP, PORT, TARGET, node_port=NODE_PORT, external_policy="Local"
        )
        node.api.update("Service", local)
        node.api.update("EndpointSlice", slice_object("web", [web.ip], TARGET, node_name="other"))
        assert _settles(lambda: _local(node) == "ConnectionResetError"), _local(node)
        rejected = _metric(
            node,
            "kubeproxy_nftables_localhost_nodeport_rejected_packets_total",
            ip_family="IPv4",
            protocol="TCP",
        )
        assert rejected is not None and rejected >= 1
        failures = "kubeproxy_nftables_localhost_nodeport_listener_creation_failures_total"
        assert _metric(node, failures, ip_family="IPv4") == 0

        # Back on this node: relayed again; the service gone: nothing listens.
        node.api.update("EndpointSlice", slice_object("web", [web.ip], TARGET))
        assert _settles(lambda: _local(node) == "web-a"), _local(node)
        node.api.delete("Service", local)
        assert _settles(lambda: _local(node) == "refused"), _local(node)
        assert (
            _metric(node, "kubeproxy_nftables_localhost_nodeport_listeners", ip_family="IPv4") == 0
        )


def test_without_the_gate_nothing_answers_on_localhost(tmp_path: Path) -> None:
    with agent_node("lhnp0", tmp_path, mode="nftables") as node:
        web = node.backend("web-a", "192.168.1.10", TARGET)
        _start(node, gate=False)
        node.api.create("Service", service_manifest("web", VIP, PORT, TARGET, node_port=NODE_PORT))
        node.api.create("EndpointSlice", slice_object("web", [web.ip], TARGET))
        # The service is programmed (its ClusterIP answers from the node)...
        assert _settles(
            lambda: (
                f"{NODE_PORT}" in node.node.run("nft", "list", "table", "ip", "kube-proxy").stdout
            )
        )
        assert _settles(
            lambda: (
                node.worker(node.node).call(lambda: tcp_exchange(VIP, PORT, 2.0)).outcome == "web-a"
            )
        )
        # ...but not on 127.0.0.1, and no KEP metric is exported.
        assert _local(node) == "refused"
        assert (
            _metric(node, "kubeproxy_nftables_localhost_nodeport_listeners", ip_family="IPv4")
            is None
        )
