"""Fixtures for the integration tests: a simulated node in network namespaces (see netns.py), the
manifests kproxy reads, and kproxy itself run inside the node namespace.

Each test gets its own namespaces (`kpt-<random>-*`), deleted after the test whatever its outcome.
The tests need root; without it they fail (never skip), so a CI run cannot pass by skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.netns import Namespace, Pod, Topology, run_kproxy, topology
from integration.traffic import start_server

_TOOLS = ("ip", "iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore")


@pytest.fixture(scope="session", autouse=True)
def _require_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the integration tests create network namespaces and program netfilter: run them as "
            "root (sudo .venv/bin/pytest integration); they are never skipped",
            pytrace=False,
        )
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"missing tools {', '.join(missing)}: install iproute2 and iptables (`make deps`)",
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def _teardown_on_sigterm() -> Iterator[None]:
    """A CI timeout sends SIGTERM, which would end pytest without running teardowns: make it a
    KeyboardInterrupt, after which pytest still deletes the namespaces."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, previous)


def service_manifest(
    name: str,
    cluster_ip: str,
    port: int,
    target_port: int,
    protocol: str = "TCP",
    namespace: str = "default",
    affinity: bool = False,
) -> dict[str, Any]:
    """A v1 Service as `kubectl get -o yaml` prints it (the fields kproxy reads, and a few more)."""
    spec: dict[str, Any] = {
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": [
            {"name": "p", "port": port, "protocol": protocol, "targetPort": target_port},
        ],
        "selector": {"app": name},
        "sessionAffinity": "ClientIP" if affinity else "None",
        "type": "ClusterIP",
    }
    if affinity:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def endpoint_slice_manifest(
    service: str,
    pods: Sequence[Pod],
    port: int,
    protocol: str = "TCP",
    namespace: str = "default",
) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice of `service` with every pod ready."""
    endpoints = [
        {
            "addresses": [pod.ip],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "node-1",
            "targetRef": {"kind": "Pod", "name": pod.name, "namespace": namespace},
        }
        for pod in pods
    ]
    return {
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": endpoints or None,  # kubectl prints `endpoints: null` for an empty slice
        "kind": "EndpointSlice",
        "metadata": {
            "generateName": f"{service}-",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
            "name": f"{service}-abcde",
            "namespace": namespace,
        },
        "ports": [{"name": "p", "port": port, "protocol": protocol}],
    }


class Cluster:
    """A simulated node plus what kproxy needs to program it: a manifest directory, an optional
    KubeProxyConfiguration, and a private xtables lock file."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.node: Namespace = topo.node
        self.outside: Namespace = topo.outside
        self.manifests = workdir / "manifests"
        self.manifests.mkdir()
        self.lock_file = workdir / "xtables.lock"
        self.config_file: Path | None = None

    # --- pods and servers

    def pod(self, name: str, ip: str) -> Pod:
        return self.topo.add_pod(name, ip)

    def backend(self, name: str, ip: str, port: int, proto: str = "tcp") -> Pod:
        """A pod running a server that answers as `name` on `port`."""
        pod = self.topo.add_pod(name, ip)
        start_server(self.topo, pod.ns, name, port, proto)
        return pod

    # --- manifests and config

    def service(
        self,
        name: str,
        cluster_ip: str,
        port: int,
        endpoints: Sequence[Pod],
        target_port: int,
        protocol: str = "TCP",
        affinity: bool = False,
    ) -> None:
        """Write (or rewrite) the Service and its EndpointSlice; the next sync picks them up."""
        docs = [
            service_manifest(name, cluster_ip, port, target_port, protocol, affinity=affinity),
            endpoint_slice_manifest(name, endpoints, target_port, protocol),
        ]
        (self.manifests / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=True))

    def configure(self, cluster_cidr: str | None = None, masquerade_all: bool = False) -> None:
        doc: dict[str, Any] = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "iptables": {"masqueradeAll": masquerade_all, "masqueradeBit": 14},
        }
        if cluster_cidr:
            doc["clusterCIDR"] = cluster_cidr
        self.config_file = self.manifests.parent / "kube-proxy-config.yaml"
        self.config_file.write_text(yaml.safe_dump(doc))

    # --- kproxy and the tables

    def kproxy(self, *args: str) -> str:
        """Run kproxy in the node namespace; returns its stdout (it must exit 0)."""
        return run_kproxy(self.node, *args, lock_file=self.lock_file).stdout

    def sync(self) -> str:
        """`kproxy sync --once`; returns its one-line summary."""
        args = ["sync", "--once", "--manifests", str(self.manifests)]
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        lines = self.kproxy(*args).splitlines()
        assert len(lines) == 1, f"sync --once should print one summary line, printed {lines}"
        return lines[0]

    def iptables(self, *args: str) -> None:
        self.node.run("iptables-legacy", "-w", *args, env={"XTABLES_LOCKFILE": str(self.lock_file)})

    def save(self) -> str:
        """The node's IPv4 tables (iptables-legacy-save), without the timestamped comments and
        with packet counters zeroed, so two calls compare equal when the rules are equal."""
        text = self.node.run("iptables-legacy-save").stdout
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in lines) + "\n"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh simulated node with no pods yet; everything is removed after the test."""
    with topology() as topo:
        yield Cluster(topo, tmp_path)
