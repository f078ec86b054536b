"""The one converter from Kubernetes objects (camelCase dicts, as the API and `kubectl get -o
yaml` give them) to kproxy's model. Nothing downstream sees a raw object.

Any JSON value may sit in any field. Each function either returns valid model values or raises
InvalidObjectError naming the object and the field; the caller skips that object and keeps going.
Names are checked as the API server checks them, so no control character reaches a rule comment.

The converter accepts what the API server accepts. An object is refused whole only where the API
server would refuse it (or a field holds a value of the wrong JSON type, which its schema
refuses), and each refusal names the rule. A bad value in a list that kube-proxy filters (an
externalIP, a source range, a load-balancer ingress IP) costs only that value, as in kube-proxy,
and is reported in the result's `skipped`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kproxy.errors import InvalidObjectError
from kproxy.model.addresses import AllowList, allows, ip_family, parse_cidr, parse_ip
from kproxy.model.fields import (
    FieldReader,
    is_dns1123_label,
    is_dns1123_subdomain,
    show,
)
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.model.slices import EndpointSliceInfo, EndpointSlicePort, build_slice_contents

__all__ = [
    "EndpointSliceInfo",
    "EndpointSlicePort",
    "ServiceInfo",
    "build_endpoint_slice",
    "build_node",
    "build_service",
    "build_service_ports",
    "object_ref",
]

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
AUTOSCALER_TAINT = "ToBeDeletedByClusterAutoscaler"
DEFAULT_AFFINITY_SECONDS = 10800
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_POLICIES = ("Cluster", "Local")
_AFFINITIES = ("None", "ClientIP")
_IP_MODES = ("VIP", "Proxy")
_PROTOCOLS = tuple(p.value for p in Protocol)
# What Go's strings.TrimSpace trims (unicode.IsSpace), which is what the API server and
# kube-proxy trim from source ranges; Python's str.strip would also take \x1c-\x1f.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    chr(c) for c in range(0x2000, 0x200B)
)


def _printable_name(value: Any) -> str:
    return value if isinstance(value, str) and is_dns1123_subdomain(value) else show(value)


def object_ref(obj: Any, kind: str) -> str:
    """`Kind namespace/name`, for messages; safe to print whatever the object holds."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    ns = meta.get("namespace") or "default"
    return f"{kind} {_printable_name(ns)}/{_printable_name(meta.get('name', '?'))}"


@dataclass(frozen=True, slots=True)
class _Meta:
    key: NamespacedName
    labels: dict[str, str]
    annotations: dict[str, str]
    deleting: bool


def _metadata(
    reader: FieldReader, obj: Any, valid_name: Callable[[str], bool], rule: str, namespaced: bool
) -> _Meta:
    """The API server requires a name, checks it by `rule` and a namespace as a DNS-1123 label;
    labels and annotations are string maps in its schema."""
    if not isinstance(obj, Mapping):
        raise reader.fail("(object)", f"must be a mapping, not {show(obj)}")
    meta = reader.mapping(obj.get("metadata"), "metadata")
    name = reader.string(meta.get("name"), "metadata.name")
    if not name:
        raise reader.fail("metadata.name", "missing")
    if not valid_name(name):
        raise reader.fail("metadata.name", f"{show(name)} is not a valid {rule}")
    namespace = "default"
    if namespaced:
        namespace = reader.string(meta.get("namespace"), "metadata.namespace") or "default"
        if not is_dns1123_label(namespace):
            raise reader.fail(
                "metadata.namespace", f"{show(namespace)} is not a valid DNS-1123 label"
            )
    return _Meta(
        NamespacedName(namespace, name),
        reader.labels(meta.get("labels"), "metadata.labels"),
        reader.labels(meta.get("annotations"), "metadata.annotations"),
        bool(meta.get("deletionTimestamp")),
    )


def _is_proxied(labels: Mapping[str, str]) -> bool:
    """False for objects upstream's informers filter out by label."""
    return SERVICE_PROXY_NAME_LABEL not in labels and HEADLESS_LABEL not in labels


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What kproxy keeps of one Service: its ports (none for a service kube-proxy does not
    proxy), and the values left out of them for a bad field, one error each."""

    ports: tuple[ServicePort, ...]
    skipped: tuple[InvalidObjectError, ...] = field(default=(), compare=False)


def _cluster_ips(reader: FieldReader, spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The API server accepts only IPs here (and allocates them from the service CIDR, so never a
    special address); kube-proxy skips a service without one. A bad one refuses the service."""
    values = reader.sequence(spec.get("clusterIPs"), "spec.clusterIPs")
    paths = [f"spec.clusterIPs[{i}]" for i in range(len(values))]
    if not values:
        single = reader.string(spec.get("clusterIP"), "spec.clusterIP")
        values, paths = ([single], ["spec.clusterIP"]) if single else ([], [])
    if not values or (values[0] == "None" and len(values) == 1):
        return ()  # headless, or not allocated yet
    ips = tuple(parse_ip(reader, v, path) for v, path in zip(values, paths, strict=True))
    if len(ips) > 2 or (len(ips) == 2 and ip_family(ips[0]) == ip_family(ips[1])):
        raise reader.fail("spec.clusterIPs", "must be at most one IPv4 and one IPv6 address")
    return ips


def _affinity_seconds(reader: FieldReader, spec: Mapping[str, Any]) -> int | None:
    """The API server allows None and ClientIP, and a timeout of 1-86400 s with ClientIP; one
    left unset is kube-proxy's default."""
    if reader.choice(spec.get("sessionAffinity"), "spec.sessionAffinity", _AFFINITIES) == "None":
        return None
    config = reader.mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    path = "spec.sessionAffinityConfig.clientIP"
    client = reader.mapping(config.get("clientIP"), path)
    seconds = client.get("timeoutSeconds")
    return reader.integer(seconds, path + ".timeoutSeconds", 1, 86400, DEFAULT_AFFINITY_SECONDS)


ALLOW_LIST_FIELD = "allowedExternalIPCIDRs"


def _allowed_vip(reader: FieldReader, value: Any, path: str, allowed: AllowList) -> str:
    """An externalIP or ingress IP: refused when special, or outside the config's allow-list
    (a kproxy extension; upstream programs any)."""
    ip = parse_ip(reader, value, path, vip=True)
    if not allows(allowed, ip):
        raise reader.fail(path, f"{ip} is outside {ALLOW_LIST_FIELD} (kproxy's config)")
    return ip


def _each_kept(
    reader: FieldReader,
    values: Any,
    path: str,
    read: Callable[[Any, str], str | None],
    ignored: str,
) -> tuple[str, ...]:
    """`read` of each entry of the list at `path`, in order and each once: an entry it refuses
    costs only itself (one warning, `ignored` saying what is dropped), as kube-proxy skips a bad
    entry and keeps the rest; None is an entry with nothing to program."""
    kept: list[str] = []
    for i, value in enumerate(reader.sequence(values, path)):
        try:
            item = read(value, f"{path}[{i}]")
        except InvalidObjectError as exc:
            reader.ignore(exc, ignored)
            continue
        if item is not None and item not in kept:
            kept.append(item)
    return tuple(kept)


def _external_ips(
    reader: FieldReader, spec: Mapping[str, Any], allowed: AllowList
) -> tuple[str, ...]:
    """kube-proxy skips an externalIP it cannot parse and keeps the rest; the API server refuses
    special ones (see special_problem). A duplicate is kept once: kube-proxy writes an identical
    rule per copy, which matches the same packets as one."""
    return _each_kept(
        reader,
        spec.get("externalIPs"),
        "spec.externalIPs",
        lambda value, path: _allowed_vip(reader, value, path, allowed),
        "this externalIP is ignored",
    )


def _source_ranges(reader: FieldReader, spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The API server allows whitespace around each range (a leftover of the annotation these
    came from) and kube-proxy trims it; kube-proxy ignores a range it cannot parse and keeps
    the rest (upstream keeps a regression test for both)."""

    def read(value: Any, path: str) -> str:
        return parse_cidr(reader, value.strip(_GO_SPACE) if isinstance(value, str) else value, path)

    path = "spec.loadBalancerSourceRanges"
    return _each_kept(
        reader, spec.get("loadBalancerSourceRanges"), path, read, "this source range is ignored"
    )


def _ingress_ip(reader: FieldReader, item: Any, path: str, allowed: AllowList) -> str | None:
    entry = reader.mapping(item, path)
    mode = reader.choice(entry.get("ipMode"), path + ".ipMode", _IP_MODES)
    if entry.get("ip") in (None, "") or mode != "VIP":
        # A hostname-only ingress; `ipMode: Proxy` is the load balancer's own business.
        return None
    return _allowed_vip(reader, entry["ip"], path + ".ip", allowed)


def _load_balancer_ips(
    reader: FieldReader, obj: Mapping[str, Any], allowed: AllowList
) -> tuple[str, ...]:
    """Ingress IPs a VIP-mode load balancer sends to the node. A bad entry costs only itself:
    the API server checks only that the IP is an IP and the mode one it knows, and special
    addresses are refused here beyond both (see special_problem)."""
    status = reader.mapping(obj.get("status"), "status")
    lb = reader.mapping(status.get("loadBalancer"), "status.loadBalancer")
    return _each_kept(
        reader,
        lb.get("ingress"),
        "status.loadBalancer.ingress",
        lambda item, path: _ingress_ip(reader, item, path, allowed),
        "this load-balancer ingress is ignored",
    )


def _shared_port(
    reader: FieldReader, obj: Mapping[str, Any], name: NamespacedName, allowed: AllowList
) -> ServicePort:
    """What every port of the service has in common (name and port filled in per port). The
    type and both traffic policies take only the values the API server allows, and so does
    healthCheckNodePort (a port number, 0 when unallocated)."""
    spec = reader.mapping(obj.get("spec"), "spec")
    svc_type = reader.choice(spec.get("type"), "spec.type", _SERVICE_TYPES)
    affinity = _affinity_seconds(reader, spec)
    external_ips = _external_ips(reader, spec, allowed)
    etp = reader.choice(spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy", _POLICIES)
    itp = reader.choice(spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy", _POLICIES)
    # Upstream's ExternallyAccessible: only these types take external traffic policy.
    externally_accessible = svc_type in ("LoadBalancer", "NodePort") or bool(external_ips)
    etp_local = externally_accessible and etp == "Local"
    health_check_port = 0
    if svc_type == "LoadBalancer" and etp_local:
        health_check_port = reader.integer(
            spec.get("healthCheckNodePort"), "spec.healthCheckNodePort", 0, 65535, 0
        )
    return ServicePort(
        name=ServicePortName(name, "", Protocol.TCP),
        cluster_ips=_cluster_ips(reader, spec),
        port=0,
        session_affinity_seconds=affinity,
        external_ips=external_ips,
        load_balancer_ips=_load_balancer_ips(reader, obj, allowed),
        load_balancer_source_ranges=_source_ranges(reader, spec),
        external_policy_local=etp_local,
        internal_policy_local=itp == "Local",
        health_check_node_port=health_check_port,
    )


def _ports(reader: FieldReader, spec: Mapping[str, Any], shared: ServicePort) -> list[ServicePort]:
    """Each refusal here is one of the API server's port rules: a name is a DNS-1123 label,
    unique, and required when there are several ports; the protocol is TCP, UDP or SCTP,
    exactly; port 1-65535; (port, protocol) and (nodePort, protocol) unique; nodePort 0 is
    none. targetPort and appProtocol are the endpoints' business: not read."""
    result: list[ServicePort] = []
    seen: dict[object, str] = {}  # port name, (port, protocol), (nodePort, protocol) -> path

    def once(what: object, path: str, problem: str) -> None:
        if what in seen:
            raise reader.fail(path, f"{problem} (as {seen[what]})")
        seen[what] = path

    for i, item in enumerate(reader.sequence(spec.get("ports"), "spec.ports")):
        path = f"spec.ports[{i}]"
        p = reader.mapping(item, path)
        port_name = reader.port_name(p, path)
        protocol = Protocol(reader.choice(p.get("protocol"), path + ".protocol", _PROTOCOLS))
        port = reader.integer(p.get("port"), path + ".port", 1, 65535)
        node_port = reader.integer(p.get("nodePort"), path + ".nodePort", 0, 65535, 0)
        once(("name", port_name), path + ".name", f"duplicate port name {show(port_name)}")
        once(("port", port, protocol), path + ".port", f"duplicate port {port}/{protocol.value}")
        if node_port:
            problem = f"duplicate node port {node_port}/{protocol.value}"
            once(("nodePort", node_port, protocol), path + ".nodePort", problem)
        result.append(
            replace(
                shared,
                name=ServicePortName(shared.name.service, port_name, protocol),
                port=port,
                node_port=node_port,
            )
        )
    return result


def build_service_ports(obj: Any) -> list[ServicePort]:
    """The ServicePorts of a Service (see build_service), without what was left out."""
    return list(build_service(obj).ports)


def build_service(obj: Any, allowed: AllowList = None) -> ServiceInfo:
    """The Service's ports, none for services kube-proxy does not proxy (headless, ExternalName,
    labelled for another proxy), and the values left out of them. `allowed` is the config's
    allow-list of externalIPs and ingress IPs (None: any)."""
    reader = FieldReader(lambda: object_ref(obj, "Service"))
    ports = _service_ports(reader, obj, allowed)
    # Nothing left out matters for a service that is not programmed.
    return ServiceInfo(tuple(ports), tuple(reader.skipped) if ports else ())


def _service_ports(reader: FieldReader, obj: Any, allowed: AllowList) -> list[ServicePort]:
    # A Service name is a DNS-1035 label, or a DNS-1123 label (it may start with a digit) where
    # the API server has RelaxedServiceNameValidation (KEP-5311, Kubernetes 1.34): the wider.
    meta = _metadata(reader, obj, is_dns1123_label, "DNS-1123 label", namespaced=True)
    spec = obj.get("spec")
    if spec is None:
        raise reader.fail("spec", "missing")
    spec = reader.mapping(spec, "spec")
    if not _is_proxied(meta.labels):
        return []
    if reader.choice(spec.get("type"), "spec.type", _SERVICE_TYPES) == "ExternalName":
        return []
    shared = _shared_port(reader, obj, meta.key, allowed)
    if not shared.cluster_ips:
        return []
    return _ports(reader, spec, shared)


def build_endpoint_slice(obj: Any) -> EndpointSliceInfo | None:
    """The slice, or None when it carries nothing kproxy uses (FQDN slices, no service label).
    An endpoint with a bad field is left out and reported in the result's `skipped`."""
    reader = FieldReader(lambda: object_ref(obj, "EndpointSlice"))
    meta = _metadata(reader, obj, is_dns1123_subdomain, "DNS-1123 subdomain", namespaced=True)
    address_type = reader.string(obj.get("addressType"), "addressType")
    service = meta.labels.get(SERVICE_NAME_LABEL, "")
    # A label value that cannot be a Service name belongs to no service kproxy programs.
    if not is_dns1123_label(service) or address_type not in ("IPv4", "IPv6"):
        return None
    if not _is_proxied(meta.labels):
        return None
    return build_slice_contents(
        reader, obj, meta.key, NamespacedName(meta.key.namespace, service), meta.annotations
    )


def _internal_ips(reader: FieldReader, status: Mapping[str, Any]) -> tuple[str, ...]:
    """The API server does not check node addresses; kube-proxy skips an InternalIP it cannot
    parse and keeps the rest."""
    primary = []
    for i, item in enumerate(reader.sequence(status.get("addresses"), "status.addresses")):
        addr = reader.mapping(item, f"status.addresses[{i}]")
        if reader.string(addr.get("type"), f"status.addresses[{i}].type") != "InternalIP":
            continue
        path = f"status.addresses[{i}].address"
        try:
            primary.append(parse_ip(reader, addr.get("address"), path, special_ok=True))
        except InvalidObjectError as exc:
            reader.ignore(exc, "this address is ignored")
    return tuple(primary)


def build_node(obj: Any) -> NodeInfo:
    """The Node; its `skipped` holds the addresses left out. The API server checks pod CIDRs
    (a bad one refuses the Node)."""
    reader = FieldReader(lambda: object_ref(obj, "Node"))
    meta = _metadata(reader, obj, is_dns1123_subdomain, "DNS-1123 subdomain", namespaced=False)
    spec = reader.mapping(obj.get("spec"), "spec")
    cidrs = reader.sequence(spec.get("podCIDRs"), "spec.podCIDRs")
    paths = [f"spec.podCIDRs[{i}]" for i in range(len(cidrs))]
    if not cidrs and spec.get("podCIDR") not in (None, ""):
        cidrs, paths = [spec["podCIDR"]], ["spec.podCIDR"]
    pod_cidrs = tuple(parse_cidr(reader, c, path) for c, path in zip(cidrs, paths, strict=True))
    primary = _internal_ips(reader, reader.mapping(obj.get("status"), "status"))
    autoscaler_taint = False
    for i, item in enumerate(reader.sequence(spec.get("taints"), "spec.taints")):
        taint = reader.mapping(item, f"spec.taints[{i}]")
        key = reader.string(taint.get("key"), f"spec.taints[{i}].key")
        autoscaler_taint = autoscaler_taint or key == AUTOSCALER_TAINT
    return NodeInfo(
        name=meta.key.name,
        labels=meta.labels,
        pod_cidrs=pod_cidrs,
        primary_ips=primary,
        draining=meta.deleting or autoscaler_taint,
        skipped=tuple(reader.skipped),
    )
