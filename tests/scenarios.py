"""Shared scenario builders: Services and EndpointSlices written as kubectl would show them (plain
dicts), fed through kproxy.model.convert into a ClusterState, then planned with plan_ruleset.

Tests import this module as `scenarios` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kproxy.model.config import ProxyConfig
from kproxy.model.convert import build_endpoint_slice, build_service_ports
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName
from kproxy.plan.iptables.ruleset import plan_ruleset
from kproxy.plan.nftables.ir import NftTable
from kproxy.plan.nftables.render import render_nft_table
from kproxy.plan.nftables.table import plan_nft_table
from kproxy.rules.ir import Ruleset
from kproxy.rules.render import render_ruleset
from kproxy.state.cluster import ClusterState

Obj = dict[str, Any]
NODE = "node-a"

# One ClusterIP Service (default/good, port 80) with one ready endpoint, as manifests the CLI
# reads: `kubectl get -o yaml` text, abridged.
ONE_SERVICE_YAML = """\
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: good-1
  namespace: default
  labels: {kubernetes.io/service-name: good}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
"""


def service_port(
    port: int,
    name: str = "",
    protocol: str = "TCP",
    target: int | None = None,
    node_port: int | None = None,
) -> Obj:
    p: Obj = {"port": port, "protocol": protocol, "targetPort": target or port}
    if name:
        p["name"] = name
    if node_port:
        p["nodePort"] = node_port
    return p


def service(
    name: str,
    cluster_ip: str | list[str],
    ports: list[Obj],
    *,
    namespace: str = "default",
    affinity_seconds: int | None = None,
    lb_ingress: list[str] | None = None,
    **spec_fields: Any,
) -> Obj:
    """A Service; `spec_fields` go into its spec as given (type, externalTrafficPolicy, ...)."""
    ips = [cluster_ip] if isinstance(cluster_ip, str) else cluster_ip
    spec: Obj = {"type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips, "ports": ports}
    if affinity_seconds is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_seconds}}
    spec.update(spec_fields)
    obj: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    if lb_ingress:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ingress]}}
    return obj


def slice_port(port: int, name: str = "", protocol: str = "TCP") -> Obj:
    p: Obj = {"port": port, "protocol": protocol}
    if name:
        p["name"] = name
    return p


def endpoint(
    ip: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    node: str | None = None,
) -> Obj:
    conditions = {
        key: value
        for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if value is not None
    }
    ep: Obj = {"addresses": [ip], "conditions": conditions}
    if node:
        ep["nodeName"] = node
    return ep


def endpoint_slice(
    service_name: str,
    slice_name: str,
    ports: list[Obj],
    endpoints: list[Obj],
    *,
    namespace: str = "default",
    address_type: str = "IPv4",
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    }


@dataclass
class Scenario:
    services: list[Obj]
    slices: list[Obj] = field(default_factory=list)
    config: ProxyConfig = field(default_factory=ProxyConfig)
    node: NodeInfo = field(default_factory=lambda: NodeInfo(NODE))

    def state(self) -> ClusterState:
        state = ClusterState()
        for obj in self.services:
            meta = obj["metadata"]
            key = NamespacedName(meta.get("namespace", "default"), meta["name"])
            state.set_service(key, build_service_ports(obj))
        for obj in self.slices:
            info = build_endpoint_slice(obj)
            if info is not None:
                state.set_slice(info)
        return state

    def ruleset(self, family: int = 4) -> Ruleset:
        state = self.state()
        return plan_ruleset(
            state.services_map(), state.endpoints_map(), self.node, self.config, family
        ).ruleset

    def render(self, family: int = 4) -> str:
        return render_ruleset(self.ruleset(family))

    def nft_table(self, family: int = 4) -> NftTable:
        state = self.state()
        return plan_nft_table(
            state.services_map(), state.endpoints_map(), self.node, self.config, family
        ).table

    def render_nft(self, family: int = 4) -> str:
        """The nftables mode's table, as `nft list table` prints it."""
        return render_nft_table(self.nft_table(family))


CLUSTER_CIDR = ProxyConfig(cluster_cidrs=("10.0.0.0/8",))


def single_service() -> Scenario:
    """The reference's worked example: ns1/svc1:p80, three endpoints, clusterCIDR 10.0.0.0/8."""
    return Scenario(
        services=[service("svc1", "172.30.0.41", [service_port(80, "p80")], namespace="ns1")],
        slices=[
            endpoint_slice(
                "svc1",
                "svc1-abc",
                [slice_port(80, "p80")],
                [endpoint(f"10.180.0.{i}") for i in (1, 2, 3)],
                namespace="ns1",
            )
        ],
        config=CLUSTER_CIDR,
    )


def multi_port() -> Scenario:
    """Named TCP, UDP and SCTP ports whose target ports differ, spread over two slices."""
    ports = [
        service_port(80, "http", "TCP", target=8080),
        service_port(53, "dns", "UDP", target=5353),
        service_port(9000, "stream", "SCTP", target=9001),
    ]
    slice_ports = [
        slice_port(8080, "http", "TCP"),
        slice_port(5353, "dns", "UDP"),
        slice_port(9001, "stream", "SCTP"),
    ]
    return Scenario(
        services=[service("multi", "172.30.0.50", ports, namespace="ns2")],
        slices=[
            endpoint_slice(
                "multi",
                "multi-abc",
                slice_ports,
                [endpoint("10.1.0.2"), endpoint("10.1.0.1")],
                namespace="ns2",
            ),
            endpoint_slice(
                "multi", "multi-def", slice_ports, [endpoint("10.1.1.1")], namespace="ns2"
            ),
        ],
    )


def no_endpoints() -> Scenario:
    """One service with no slice at all, one whose only endpoint is neither ready nor serving."""
    return Scenario(
        services=[
            service("empty", "172.30.0.60", [service_port(443, "https")], namespace="ns3"),
            service("down", "172.30.0.61", [service_port(53, "", "UDP")], namespace="ns3"),
        ],
        slices=[
            endpoint_slice(
                "down",
                "down-abc",
                [slice_port(5353, "", "UDP")],
                [endpoint("10.3.0.1", ready=False, serving=False)],
                namespace="ns3",
            )
        ],
        config=CLUSTER_CIDR,
    )


def terminating_fallback() -> Scenario:
    """No endpoint is ready: the serving+terminating ones are used, the not-serving one is not."""
    return Scenario(
        services=[service("draining", "172.30.0.70", [service_port(80)], namespace="ns4")],
        slices=[
            endpoint_slice(
                "draining",
                "draining-abc",
                [slice_port(8080)],
                [
                    endpoint("10.4.0.1", ready=False, serving=True, terminating=True),
                    endpoint("10.4.0.2", ready=False, serving=False, terminating=True),
                    endpoint("10.4.0.3", ready=False, serving=True, terminating=True),
                ],
                namespace="ns4",
            )
        ],
        config=CLUSTER_CIDR,
    )


def affinity() -> Scenario:
    """sessionAffinity: ClientIP with the default three-hour timeout."""
    return Scenario(
        services=[
            service(
                "sticky",
                "172.30.0.80",
                [service_port(80, "http")],
                namespace="ns5",
                affinity_seconds=10800,
            )
        ],
        slices=[
            endpoint_slice(
                "sticky",
                "sticky-abc",
                [slice_port(8080, "http")],
                [endpoint("10.5.0.1"), endpoint("10.5.0.2")],
                namespace="ns5",
            )
        ],
        config=CLUSTER_CIDR,
    )


def masquerade_all() -> Scenario:
    """masqueradeAll: every connection to the ClusterIP is marked, whatever its source."""
    return Scenario(
        services=[service("web", "172.30.0.90", [service_port(8080, "web")], namespace="ns6")],
        slices=[
            endpoint_slice(
                "web",
                "web-abc",
                [slice_port(8080, "web")],
                [endpoint("10.6.0.1"), endpoint("10.6.0.2")],
                namespace="ns6",
            )
        ],
        config=ProxyConfig(cluster_cidrs=("10.0.0.0/8",), masquerade_all=True),
    )


def large_cluster(big: int = 1000) -> Scenario:
    """A big service pushing the endpoint total past 1000, and a small one to look at."""
    big_endpoints = [endpoint(f"10.7.{i // 250}.{i % 250 + 1}") for i in range(big)]
    return Scenario(
        services=[
            service("big", "172.30.1.1", [service_port(80)], namespace="ns7"),
            service("small", "172.30.1.2", [service_port(80)], namespace="ns7"),
        ],
        slices=[
            endpoint_slice("big", "big-abc", [slice_port(80)], big_endpoints, namespace="ns7"),
            endpoint_slice(
                "small",
                "small-abc",
                [slice_port(8080)],
                [endpoint("10.8.0.1"), endpoint("10.8.0.2")],
                namespace="ns7",
            ),
        ],
        config=CLUSTER_CIDR,
    )


def dual_stack() -> Scenario:
    """One service with an IPv4 and an IPv6 ClusterIP, one slice per family."""
    return Scenario(
        services=[
            service(
                "dual",
                ["172.30.0.100", "fd00:30::100"],
                [service_port(80, "http")],
                namespace="ns8",
            )
        ],
        slices=[
            endpoint_slice(
                "dual",
                "dual-v4",
                [slice_port(8080, "http")],
                [endpoint("10.9.0.1"), endpoint("10.9.0.2")],
                namespace="ns8",
            ),
            endpoint_slice(
                "dual",
                "dual-v6",
                [slice_port(8080, "http")],
                [endpoint("fd00:10:9::1"), endpoint("fd00:10:9::2")],
                namespace="ns8",
                address_type="IPv6",
            ),
        ],
        config=ProxyConfig(cluster_cidrs=("10.0.0.0/8", "fd00:10::/32")),
    )


NODE_IP = "192.168.1.10"


def external(
    etp: str = "Cluster",
    itp: str = "Cluster",
    local_endpoint: bool = True,
    source_ranges: tuple[str, ...] = (),
) -> Scenario:
    """A LoadBalancer service (NodePort 30080, externalIP 192.0.2.10, LB IP 198.51.100.10) with
    one endpoint on another node and, optionally, one on this node."""
    eps = [endpoint("10.20.0.2", node="node-b")]
    if local_endpoint:
        eps.insert(0, endpoint("10.20.0.1", node=NODE))
    fields: Obj = {
        "type": "LoadBalancer",
        "externalTrafficPolicy": etp,
        "internalTrafficPolicy": itp,
        "externalIPs": ["192.0.2.10"],
    }
    if source_ranges:
        fields["loadBalancerSourceRanges"] = list(source_ranges)
    if etp == "Local":
        fields["healthCheckNodePort"] = 32000
    return Scenario(
        services=[
            service(
                "lb",
                "172.30.0.110",
                [service_port(80, "http", node_port=30080)],
                namespace="ns9",
                lb_ingress=["198.51.100.10"],
                **fields,
            )
        ],
        slices=[endpoint_slice("lb", "lb-abc", [slice_port(8080, "http")], eps, namespace="ns9")],
        config=CLUSTER_CIDR,
        node=NodeInfo(NODE, local_addresses=(NODE_IP, "127.0.0.1"), primary_ips=(NODE_IP,)),
    )


def topology() -> Scenario:
    """Every ready endpoint carries a zone hint: this node (zone z1) uses only the z1 ones."""
    eps = [endpoint("10.30.0.1"), endpoint("10.30.0.2"), endpoint("10.30.0.3")]
    for ep, zone in zip(eps, ("z1", "z2", "z1"), strict=True):
        ep["hints"] = {"forZones": [{"name": zone}]}
    return Scenario(
        services=[service("zonal", "172.30.0.120", [service_port(80, "http")], namespace="ns10")],
        slices=[
            endpoint_slice("zonal", "zonal-a", [slice_port(8080, "http")], eps, namespace="ns10")
        ],
        config=CLUSTER_CIDR,
        node=NodeInfo(NODE, labels={"topology.kubernetes.io/zone": "z1"}),
    )


SCENARIOS = {
    "single_service": single_service,
    "multi_port": multi_port,
    "no_endpoints": no_endpoints,
    "terminating_fallback": terminating_fallback,
    "affinity": affinity,
    "masquerade_all": masquerade_all,
    "dual_stack": dual_stack,
}


GOLDEN = Path(__file__).parent / "golden"


def assert_golden(name: str, text: str, suffix: str = ".rules") -> None:
    """`text` equals tests/golden/NAME.rules (or NAME + suffix); with KPROXY_UPDATE_GOLDEN=1 it
    is written there instead, to be reviewed as a diff."""
    path = GOLDEN / f"{name}{suffix}"
    if os.environ.get("KPROXY_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.exists(), f"{path} missing: generate it with KPROXY_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text()
