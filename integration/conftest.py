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
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.iptables_backend import iptables_tool, mode_backend, save_tool
from integration.manifests import NODE_NAME, endpoint_slice_manifest, service_manifest
from integration.netns import Namespace, Pod, Topology, run, run_kproxy, topology, unique_prefix
from integration.traffic import start_server

# The kernel modes the traffic tests run in. A test (or module) marked `both_modes` runs once per
# mode: the `proxy_mode` fixture takes each value and `cluster` (and agent_node) write it into the
# KubeProxyConfiguration. Unmarked tests run in the iptables mode only.
MODES = ("iptables", "nftables")
both_modes = pytest.mark.parametrize("proxy_mode", MODES, indirect=True)

_TOOLS = (
    "ip",
    "iptables-legacy",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "nft",
)
# The node kproxy programs (--hostname-override), and another one: endpoints whose nodeName is
# REMOTE_NODE count as remote for traffic policies, though the simulated node still routes to them.


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
            f"missing tools {', '.join(missing)}: install iproute2, iptables and nftables "
            "(`make deps`)",
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def _teardown_on_sigterm() -> Iterator[None]:
    """A CI timeout sends SIGTERM, which would end pytest without running teardowns: make it a
    KeyboardInterrupt, after which pytest still deletes the namespaces."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, previous)


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
        self.mode = "iptables"  # the proxy mode configure() writes and sync() runs

    # --- pods and servers

    def pod(self, name: str, ip: str) -> Pod:
        return self.topo.add_pod(name, ip)

    def backend(
        self, name: str, ip: str, port: int, proto: str = "tcp", ip6: str | None = None
    ) -> Pod:
        """A pod running a server that answers as `name` on `port` (on both families when the
        pod has an IPv6 address `ip6`)."""
        pod = self.topo.add_pod(name, ip, ip6)
        start_server(self.topo, pod.ns, name, port, proto, family="both" if ip6 else "4")
        return pod

    def add_outside(self, name: str, ip: str, node_ip: str) -> Namespace:
        """Another client beyond the node, on its own link; `node_ip` is the node's address on
        that link (see Topology.add_outside)."""
        return self.topo.add_outside(name, ip, node_ip)

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
        *,
        remote: Collection[str] = (),
        **options: Any,
    ) -> None:
        """Write (or rewrite) the Service and its EndpointSlice(s); the next sync picks them up.
        `options` are service_manifest's keyword arguments (node_port, external_ips, ...); with
        `cluster_ip6` an IPv6 slice of the pods' IPv6 addresses is written too. Pods named in
        `remote` are endpoints on another node."""
        docs = [
            service_manifest(
                name, cluster_ip, port, target_port, protocol, affinity=affinity, **options
            ),
            endpoint_slice_manifest(name, endpoints, target_port, protocol, remote=remote),
        ]
        if options.get("cluster_ip6"):
            docs.append(
                endpoint_slice_manifest(
                    name, endpoints, target_port, protocol, remote=remote, family=6
                )
            )
        (self.manifests / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=True))

    def configure(
        self,
        cluster_cidr: str | None = None,
        masquerade_all: bool = False,
        localhost_nodeports: bool | None = None,
        node_port_addresses: Sequence[str] = (),
        detect_local_mode: str | None = None,
        interface_name_prefix: str | None = None,
    ) -> None:
        """Write a KubeProxyConfiguration with these fields; sync() passes it with --config."""
        doc: dict[str, Any] = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": self.mode,
            # The section the mode reads (the nftables mode: `nftables:`, as upstream).
            self.section(): {"masqueradeAll": masquerade_all, "masqueradeBit": 14},
        }
        if cluster_cidr:
            doc["clusterCIDR"] = cluster_cidr
        if localhost_nodeports is not None:
            doc.setdefault("iptables", {})["localhostNodePorts"] = localhost_nodeports
        if node_port_addresses:
            doc["nodePortAddresses"] = list(node_port_addresses)
        if detect_local_mode:
            doc["detectLocalMode"] = detect_local_mode
        if interface_name_prefix:
            doc["detectLocal"] = {"interfaceNamePrefix": interface_name_prefix}
        self.config_file = self.manifests.parent / "kube-proxy-config.yaml"
        self.config_file.write_text(yaml.safe_dump(doc))

    def section(self) -> str:
        """The config section of masquerade and sync settings this mode reads."""
        return "nftables" if self.mode == "nftables" else "iptables"

    def node_object(self, internal_ips: Sequence[str] = (), pod_cidrs: Sequence[str] = ()) -> None:
        """Write this node's v1 Node object (NODE_NAME), with its InternalIP addresses (what
        `nodePortAddresses: [primary]` means) and pod CIDRs (`detectLocalMode: NodeCIDR`)."""
        spec: dict[str, Any] = {}
        if pod_cidrs:
            spec = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)}
        doc = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
            "spec": spec,
            "status": {
                "addresses": [
                    *({"type": "InternalIP", "address": ip} for ip in internal_ips),
                    {"type": "Hostname", "address": NODE_NAME},
                ]
            },
        }
        (self.manifests / "node.yaml").write_text(yaml.safe_dump(doc, sort_keys=True))

    # --- kproxy and the tables

    def kproxy(self, *args: str) -> str:
        """Run kproxy in the node namespace; returns its stdout (it must exit 0)."""
        return run_kproxy(self.node, *args, lock_file=self.lock_file).stdout

    def config_args(self) -> list[str]:
        """`--config FILE` for a kproxy command, written first when the mode is not the default
        (the iptables mode); nothing when there is no config."""
        if self.config_file is None and self.mode != "iptables":
            self.configure()
        return [] if self.config_file is None else ["--config", str(self.config_file)]

    def sync(self) -> str:
        """`kproxy sync --once` as node NODE_NAME; returns its one-line summary."""
        args = ["sync", "--once", "--manifests", str(self.manifests)]
        args += ["--hostname-override", NODE_NAME, *self.config_args()]
        lines = self.kproxy(*args).splitlines()
        assert len(lines) == 1, f"sync --once should print one summary line, printed {lines}"
        return lines[0]

    def rules(self, family: int = 4) -> str:
        """What the proxy mode wrote into the kernel for one family, as comparable text: the
        legacy tables (save()) in the iptables mode, kproxy's `ip|ip6 kube-proxy` table in the
        nftables mode (empty when it is gone; the node's other tables hold counters that traffic
        changes)."""
        if self.mode == "nftables":
            table = ("ip" if family == 4 else "ip6", "kube-proxy")
            return self.node.run("nft", "list", "table", *table, check=False).stdout
        return self.save(family)

    @property
    def iptables_backend(self) -> str:
        """Where the iptables (or userspace) mode's rules are on this node (iptables_backend.py)."""
        return mode_backend(self.topo, self.mode)

    def iptables(self, *args: str) -> None:
        self.node.run(
            iptables_tool(self.iptables_backend),
            "-w",
            *args,
            env={"XTABLES_LOCKFILE": str(self.lock_file)},
        )

    def save(self, family: int = 4) -> str:
        """The node's IPv4 (or IPv6) tables of the backend the mode writes (iptables-legacy-save
        or iptables-nft-save), without the timestamped comments and with packet counters zeroed,
        so two calls compare equal when the rules are equal."""
        tool = save_tool(self.iptables_backend, family)
        text = self.node.run(tool).stdout
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in lines) + "\n"


@pytest.fixture
def proxy_mode(request: pytest.FixtureRequest) -> str:
    """The proxy mode under test: `iptables`, or each of MODES in a test marked `both_modes`."""
    mode = getattr(request, "param", "iptables")
    assert mode in MODES, mode
    return str(mode)


@pytest.fixture
def cluster(tmp_path: Path, proxy_mode: str) -> Iterator[Cluster]:
    """A fresh simulated node with no pods yet, running `proxy_mode`; everything is removed after
    the test."""
    with topology() as topo:
        built = Cluster(topo, tmp_path)
        built.mode = proxy_mode
        yield built


@pytest.fixture
def namespaces() -> Iterator[tuple[Namespace, Namespace]]:
    prefix = unique_prefix("oracle")
    pair = (Namespace(prefix + "-a"), Namespace(prefix + "-b"))
    try:
        for ns in pair:
            run(["ip", "netns", "add", ns.name])
        yield pair
    finally:
        for ns in pair:
            run(["ip", "netns", "del", ns.name], check=False)
