"""Kubernetes objects as `kubectl get -o yaml` prints them, for the integration tests (written
to manifest files, or created through the test API server)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from integration.netns import Pod

NODE_NAME = "node-1"
REMOTE_NODE = "node-2"


def service_manifest(
    name: str,
    cluster_ip: str,
    port: int,
    target_port: int,
    protocol: str = "TCP",
    namespace: str = "default",
    affinity: bool = False,
    *,
    node_port: int | None = None,
    external_ips: Sequence[str] = (),
    load_balancer_ips: Sequence[str] = (),
    source_ranges: Sequence[str] = (),
    external_policy: str = "Cluster",
    internal_policy: str = "Cluster",
    health_check_node_port: int | None = None,
    cluster_ip6: str | None = None,
) -> dict[str, Any]:
    """A v1 Service as `kubectl get -o yaml` prints it (the fields kproxy reads, and a few more).

    The type follows from what is given, as a user would choose it: LoadBalancer with
    `load_balancer_ips` (written to status.loadBalancer.ingress, as a cloud controller does),
    NodePort with `node_port`, else ClusterIP. `cluster_ip6` makes it dual-stack."""
    service_type = "LoadBalancer" if load_balancer_ips else "NodePort" if node_port else "ClusterIP"
    service_port: dict[str, Any] = {
        "name": "p",
        "port": port,
        "protocol": protocol,
        "targetPort": target_port,
    }
    if node_port:
        service_port["nodePort"] = node_port
    cluster_ips = [cluster_ip, *([cluster_ip6] if cluster_ip6 else [])]
    spec: dict[str, Any] = {
        "clusterIP": cluster_ip,
        "clusterIPs": cluster_ips,
        "internalTrafficPolicy": internal_policy,
        "ipFamilies": ["IPv4", "IPv6"][: len(cluster_ips)],
        "ipFamilyPolicy": "RequireDualStack" if cluster_ip6 else "SingleStack",
        "ports": [service_port],
        "selector": {"app": name},
        "sessionAffinity": "ClientIP" if affinity else "None",
        "type": service_type,
    }
    if affinity:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
    if service_type != "ClusterIP" or external_ips:
        spec["externalTrafficPolicy"] = external_policy
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    if health_check_node_port:
        spec["healthCheckNodePort"] = health_check_node_port
    ingress = [{"ip": ip, "ipMode": "VIP"} for ip in load_balancer_ips]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": spec,
        "status": {"loadBalancer": {"ingress": ingress} if ingress else {}},
    }


def endpoint_slice_manifest(
    service: str,
    pods: Sequence[Pod],
    port: int,
    protocol: str = "TCP",
    namespace: str = "default",
    *,
    remote: Collection[str] = (),
    family: int = 4,
) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice of `service` with every pod ready, holding the pods'
    IPv4 or (`family=6`) IPv6 addresses. Pods named in `remote` run on REMOTE_NODE, the others on
    NODE_NAME."""
    endpoints = []
    for pod in pods:
        address = pod.ip if family == 4 else pod.ip6
        if address is None:
            raise ValueError(f"pod {pod.name} has no IPv6 address")
        endpoints.append(
            {
                "addresses": [address],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": REMOTE_NODE if pod.name in remote else NODE_NAME,
                "targetRef": {"kind": "Pod", "name": pod.name, "namespace": namespace},
            }
        )
    return {
        "addressType": f"IPv{family}",
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": endpoints or None,  # kubectl prints `endpoints: null` for an empty slice
        "kind": "EndpointSlice",
        "metadata": {
            "generateName": f"{service}-",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
            "name": f"{service}-{'abcde' if family == 4 else 'v6xyz'}",
            "namespace": namespace,
        },
        "ports": [{"name": "p", "port": port, "protocol": protocol}],
    }
