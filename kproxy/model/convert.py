"""The one converter from Kubernetes objects (camelCase dicts, as the API and `kubectl get -o
yaml` give them) to kproxy's model. Nothing downstream sees a raw object.

Each function raises InvalidObjectError naming the object and the field when the object cannot be
programmed; the caller skips that object and keeps going.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kproxy.errors import InvalidObjectError
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
AUTOSCALER_TAINT = "ToBeDeletedByClusterAutoscaler"
DEFAULT_AFFINITY_SECONDS = 10800


@dataclass(frozen=True, slots=True)
class EndpointSlicePort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    """What kproxy keeps of one EndpointSlice."""

    key: NamespacedName
    service: NamespacedName
    address_type: str
    ports: tuple[EndpointSlicePort, ...]
    endpoints: tuple[Endpoint, ...]
    # When the change behind this version of the slice happened (epoch seconds), if known.
    trigger_time: float | None = field(default=None, compare=False)


def object_ref(obj: Mapping[str, Any]) -> str:
    """`Kind namespace/name`, for messages."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace") or "default"
    return f"{obj.get('kind', 'object')} {ns}/{meta.get('name', '?')}"


def _meta(obj: Mapping[str, Any]) -> tuple[NamespacedName, Mapping[str, str]]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name"):
        raise InvalidObjectError(object_ref(obj), "metadata.name", "missing")
    labels = meta.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise InvalidObjectError(object_ref(obj), "metadata.labels", "must be a mapping")
    return NamespacedName(str(meta.get("namespace") or "default"), str(meta["name"])), labels


def is_proxied(obj: Mapping[str, Any]) -> bool:
    """False for objects upstream's informers filter out by label."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return SERVICE_PROXY_NAME_LABEL not in labels and HEADLESS_LABEL not in labels


def _ip(value: Any, ref: str, field: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise InvalidObjectError(ref, field, f"{value!r} is not an IP address") from None


def _port(value: Any, ref: str, field: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidObjectError(ref, field, f"{value!r} is not a port number")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise InvalidObjectError(ref, field, f"{value} is out of range {low}-65535")
    return value


def _protocol(value: Any, ref: str, field: str) -> Protocol:
    try:
        return Protocol(value or "TCP")
    except ValueError:
        raise InvalidObjectError(ref, field, f"{value!r} is not TCP, UDP or SCTP") from None


def _cluster_ips(spec: Mapping[str, Any], ref: str) -> tuple[str, ...]:
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not isinstance(ips, Sequence) or isinstance(ips, str):
        raise InvalidObjectError(ref, "spec.clusterIPs", "must be a list")
    if any(str(ip) == "None" for ip in ips):
        return ()
    return tuple(_ip(ip, ref, f"spec.clusterIPs[{i}]") for i, ip in enumerate(ips))


def _affinity_seconds(spec: Mapping[str, Any], ref: str) -> int | None:
    if spec.get("sessionAffinity", "None") != "ClientIP":
        return None
    cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP")) or {}
    seconds = cfg.get("timeoutSeconds", DEFAULT_AFFINITY_SECONDS)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 < seconds <= 86400:
        raise InvalidObjectError(
            ref, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", f"{seconds!r} not in 1-86400"
        )
    return seconds


def _ip_list(values: Any, ref: str, field: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise InvalidObjectError(ref, field, "must be a list")
    return tuple(_ip(v, ref, f"{field}[{i}]") for i, v in enumerate(values))


def _source_ranges(spec: Mapping[str, Any], ref: str) -> tuple[str, ...]:
    ranges = []
    for i, value in enumerate(spec.get("loadBalancerSourceRanges") or []):
        try:
            ranges.append(str(ipaddress.ip_network(str(value).strip(), strict=False)))
        except ValueError:
            raise InvalidObjectError(
                ref, f"spec.loadBalancerSourceRanges[{i}]", f"{value!r} is not a CIDR"
            ) from None
    return tuple(ranges)


def _load_balancer_ips(obj: Mapping[str, Any], ref: str) -> tuple[str, ...]:
    """Ingress IPs a VIP-mode load balancer sends to the node; `ipMode: Proxy` ones are the load
    balancer's own business and are skipped, as upstream does."""
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    ips = []
    for i, entry in enumerate(ingress):
        if not isinstance(entry, Mapping) or not entry.get("ip"):
            continue
        if entry.get("ipMode", "VIP") != "VIP":
            continue
        ips.append(_ip(entry["ip"], ref, f"status.loadBalancer.ingress[{i}].ip"))
    return tuple(ips)


def build_service_ports(obj: Mapping[str, Any]) -> list[ServicePort]:
    """The ServicePorts of a Service; empty for services kube-proxy does not proxy (headless,
    ExternalName, labelled for another proxy)."""
    ref = object_ref({**obj, "kind": "Service"})
    name, _ = _meta(obj)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise InvalidObjectError(ref, "spec", "missing")
    svc_type = spec.get("type") or "ClusterIP"
    if not is_proxied(obj) or svc_type == "ExternalName":
        return []
    cluster_ips = _cluster_ips(spec, ref)
    if not cluster_ips:
        return []
    affinity = _affinity_seconds(spec, ref)
    external_ips = _ip_list(spec.get("externalIPs"), ref, "spec.externalIPs")
    # Upstream's ExternallyAccessible: only these types take external traffic policy.
    externally_accessible = svc_type in ("LoadBalancer", "NodePort") or bool(external_ips)
    etp_local = externally_accessible and spec.get("externalTrafficPolicy") == "Local"
    health_check_port = 0
    if svc_type == "LoadBalancer" and etp_local:
        health_check_port = _port(
            spec.get("healthCheckNodePort", 0), ref, "spec.healthCheckNodePort", True
        )
    shared = ServicePort(
        name=ServicePortName(name, "", Protocol.TCP),
        cluster_ips=cluster_ips,
        port=0,
        session_affinity_seconds=affinity,
        external_ips=external_ips,
        load_balancer_ips=_load_balancer_ips(obj, ref),
        load_balancer_source_ranges=_source_ranges(spec, ref),
        external_policy_local=etp_local,
        internal_policy_local=spec.get("internalTrafficPolicy") == "Local",
        health_check_node_port=health_check_port,
    )
    ports = spec.get("ports") or []
    if not isinstance(ports, Sequence):
        raise InvalidObjectError(ref, "spec.ports", "must be a list")
    result = []
    for i, p in enumerate(ports):
        if not isinstance(p, Mapping):
            raise InvalidObjectError(ref, f"spec.ports[{i}]", "must be a mapping")
        protocol = _protocol(p.get("protocol"), ref, f"spec.ports[{i}].protocol")
        result.append(
            replace(
                shared,
                name=ServicePortName(name, str(p.get("name") or ""), protocol),
                port=_port(p.get("port"), ref, f"spec.ports[{i}].port"),
                node_port=_port(p.get("nodePort", 0), ref, f"spec.ports[{i}].nodePort", True),
            )
        )
    return result


def _conditions(ep: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    cond = ep.get("conditions") or {}
    ready = cond.get("ready")
    serving = cond.get("serving")
    terminating = cond.get("terminating")
    # Unset conditions mean ready and serving, not terminating (EndpointSlice API semantics).
    return (
        ready is not False,
        (ready is not False) if serving is None else bool(serving),
        bool(terminating),
    )


def build_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSliceInfo | None:
    """The slice, or None when it carries nothing kproxy uses (FQDN slices, no service label)."""
    ref = object_ref({**obj, "kind": "EndpointSlice"})
    key, labels = _meta(obj)
    service = labels.get(SERVICE_NAME_LABEL)
    address_type = obj.get("addressType")
    if not service or address_type not in ("IPv4", "IPv6") or not is_proxied(obj):
        return None
    ports = []
    for i, p in enumerate(obj.get("ports") or []):
        if not isinstance(p, Mapping) or not p.get("port"):
            continue
        ports.append(
            EndpointSlicePort(
                name=str(p.get("name") or ""),
                port=_port(p["port"], ref, f"ports[{i}].port"),
                protocol=_protocol(p.get("protocol"), ref, f"ports[{i}].protocol"),
            )
        )
    endpoints = []
    for i, ep in enumerate(obj.get("endpoints") or []):
        addresses = ep.get("addresses") if isinstance(ep, Mapping) else None
        if not addresses:
            raise InvalidObjectError(ref, f"endpoints[{i}].addresses", "missing")
        ip = _ip(addresses[0], ref, f"endpoints[{i}].addresses[0]")
        if ipaddress.ip_address(ip).version != (4 if address_type == "IPv4" else 6):
            raise InvalidObjectError(
                ref, f"endpoints[{i}].addresses[0]", f"{ip} is not {address_type}"
            )
        ready, serving, terminating = _conditions(ep)
        hints = ep.get("hints") or {}
        endpoints.append(
            Endpoint(
                ip=ip,
                port=0,
                ready=ready,
                serving=serving,
                terminating=terminating,
                node_name=str(ep.get("nodeName") or ""),
                zone_hints=tuple(str(z.get("name")) for z in hints.get("forZones") or []),
                node_hints=tuple(str(n.get("name")) for n in hints.get("forNodes") or []),
            )
        )
    return EndpointSliceInfo(
        key=key,
        service=NamespacedName(key.namespace, str(service)),
        address_type=str(address_type),
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=_trigger_time(obj),
    )


def _trigger_time(obj: Mapping[str, Any]) -> float | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_TIME_ANNOTATION)
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None  # a bad annotation only costs the latency metric


def build_node(obj: Mapping[str, Any]) -> NodeInfo:
    ref = object_ref({**obj, "kind": "Node"})
    key, labels = _meta(obj)
    spec = obj.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    for i, cidr in enumerate(cidrs):
        try:
            ipaddress.ip_network(str(cidr), strict=False)
        except ValueError:
            raise InvalidObjectError(
                ref, f"spec.podCIDRs[{i}]", f"{cidr!r} is not a CIDR"
            ) from None
    primary = []
    for i, addr in enumerate((obj.get("status") or {}).get("addresses") or []):
        if isinstance(addr, Mapping) and addr.get("type") == "InternalIP":
            primary.append(_ip(addr.get("address"), ref, f"status.addresses[{i}].address"))
    taints = spec.get("taints") or []
    draining = bool((obj.get("metadata") or {}).get("deletionTimestamp")) or any(
        isinstance(t, Mapping) and t.get("key") == AUTOSCALER_TAINT for t in taints
    )
    return NodeInfo(
        name=key.name,
        labels=dict(labels),
        pod_cidrs=tuple(str(c) for c in cidrs),
        primary_ips=tuple(primary),
        draining=draining,
    )
