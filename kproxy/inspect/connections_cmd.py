"""`kproxy connections`: the node's live conntrack flows of kproxy's services, grouped by
service port and endpoint.

A flow belongs to a service port when its original destination is one of the port's VIPs
(ClusterIP, external IP, load-balancer IP) or its NodePort on one of the node's addresses; its
reply's source is the endpoint the kernel's DNAT picked (the iptables and nftables modes).

The userspace mode's relay terminates each connection, so conntrack holds two unrelated flows
for one: the client's to the VIP, redirected to a relay listener on a node address (leg
`to-relay`: the endpoint cannot be read from it), and the relay's own from a node address to
the endpoint (leg `from-relay`, matched by the endpoint's address, port and protocol). Any other
connection the node itself opens to an endpoint (a kubelet probe) looks the same as a relay's
and is listed with them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kproxy.dataplane.ctflows import SCTP, TCP, Flow, dump_flows
from kproxy.dataplane.ctnetlink import UDP, CtSocket
from kproxy.errors import KproxyError
from kproxy.inspect.inputs import (
    build_state,
    in_live_mode,
    load_config_file,
    local_addresses,
    node_families,
    read_all_manifests,
    read_cluster_objects,
)
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.state.cluster import ClusterState, EndpointsMap, ServicesMap

PROTOCOL_NUMBERS = {Protocol.TCP: TCP, Protocol.UDP: UDP, Protocol.SCTP: SCTP}
DIRECT, TO_RELAY, FROM_RELAY = "direct", "to-relay", "from-relay"

Key = tuple[int, str, int]  # (IP protocol number, address, port)


class ConnectionsInputError(KproxyError):
    """A service name or endpoint address the command cannot use."""


@dataclass(frozen=True, slots=True)
class Connection:
    service: ServicePortName
    via: str  # ClusterIP, ExternalIP, LoadBalancerIP, NodePort; Endpoint for a relay's leg
    endpoint: str  # `ip:port`; "" when the flow does not say (a relay's client leg, no DNAT)
    leg: str  # DIRECT, TO_RELAY or FROM_RELAY
    flow: Flow


@dataclass(frozen=True, slots=True)
class FlowIndex:
    """What a flow's destination can be: the VIPs, NodePorts and endpoints of the services."""

    vips: dict[Key, list[tuple[ServicePortName, str]]]
    node_ports: dict[tuple[int, int], list[ServicePortName]]
    endpoints: dict[Key, list[ServicePortName]]


def _ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def build_index(services: ServicesMap, endpoints: EndpointsMap) -> FlowIndex:
    index = FlowIndex({}, {}, {})
    for name, sp in services.items():
        proto = PROTOCOL_NUMBERS[sp.protocol]
        for kind, addresses in _vips_of(sp):
            for address in addresses:
                index.vips.setdefault((proto, _ip(address), sp.port), []).append((name, kind))
        if sp.node_port:
            index.node_ports.setdefault((proto, sp.node_port), []).append(name)
        for ep in endpoints.get(name, ()):
            index.endpoints.setdefault((proto, _ip(ep.ip), ep.port), []).append(name)
    return index


def _vips_of(sp: ServicePort) -> Iterable[tuple[str, Sequence[str]]]:
    yield "ClusterIP", sp.cluster_ips
    yield "ExternalIP", sp.external_ips
    yield "LoadBalancerIP", sp.load_balancer_ips


def match_flow(
    flow: Flow, index: FlowIndex, local: Collection[str], userspace: bool
) -> list[Connection]:
    """The service ports (usually one) a flow belongs to; none for a flow of no service."""
    key = (flow.protocol, flow.dst, flow.dport)
    targets = list(index.vips.get(key, ()))
    if not targets and flow.dst in local:
        targets = [(n, "NodePort") for n in index.node_ports.get((flow.protocol, flow.dport), ())]
    if targets:
        translated = (flow.reply_src, flow.reply_sport) != (flow.dst, flow.dport)
        leg = TO_RELAY if userspace else DIRECT
        endpoint = _hostport(flow.reply_src, flow.reply_sport) if translated else ""
        endpoint = "" if userspace else endpoint
        return [Connection(name, via, endpoint, leg, flow) for name, via in targets]
    if userspace and flow.src in local:
        endpoint = _hostport(flow.dst, flow.dport)
        names = index.endpoints.get(key, ())
        return [Connection(name, "Endpoint", endpoint, FROM_RELAY, flow) for name in names]
    return []


def select_connections(
    flows: Iterable[Flow],
    index: FlowIndex,
    local: Collection[str],
    userspace: bool,
    service: NamespacedName | None = None,
    endpoint_ip: str | None = None,
) -> list[Connection]:
    """The flows of kproxy's services (of `service`, to `endpoint_ip`), in a stable order."""
    local = {_ip(a) for a in local}
    found = [
        conn
        for flow in flows
        for conn in match_flow(flow, index, local, userspace)
        if (service is None or conn.service.service == service)
        and (endpoint_ip is None or _endpoint_ip(conn.endpoint) == endpoint_ip)
    ]
    return sorted(found, key=_order)


def _endpoint_ip(endpoint: str) -> str:
    return endpoint.rpartition(":")[0].strip("[]")


def _order(conn: Connection) -> tuple[Any, ...]:
    f = conn.flow
    return (conn.service, conn.endpoint, conn.leg, f.src, f.sport, f.dst, f.dport, f.id)


def parse_service(text: str | None) -> NamespacedName | None:
    if text is None:
        return None
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise ConnectionsInputError(f"service {text!r}: expected NAMESPACE/NAME, e.g. default/web")
    return NamespacedName(namespace, name)


def parse_endpoint_ip(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return _ip(text)
    except ValueError:
        raise ConnectionsInputError(f"--endpoint {text!r} is not an IP address") from None


def read_flows(
    families: Iterable[int], protocols: Iterable[Protocol], addresses: Collection[str]
) -> list[Flow]:
    """The node's conntrack flows of these families and protocols from or to `addresses`
    (read only)."""
    numbers = sorted({PROTOCOL_NUMBERS[p] for p in protocols})
    with CtSocket() as ct:
        return [
            flow
            for family in families
            for n in numbers
            for flow in dump_flows(ct, family, n, addresses)
        ]


def watched_addresses(index: FlowIndex, local: Collection[str]) -> set[str]:
    """The addresses a flow of a service starts or ends at: the VIPs and the node's own (its
    NodePorts, and the userspace relay's connections to endpoints)."""
    return {key[1] for key in index.vips} | {_ip(a) for a in local}


def service_families(services: ServicesMap) -> tuple[int, ...]:
    found = {
        ipaddress.ip_address(a).version
        for sp in services.values()
        for _, addresses in _vips_of(sp)
        for a in addresses
    }
    return tuple(sorted(found or {4}))


def live_connections(
    state: ClusterState,
    local: Collection[str],
    mode: str,
    families: Collection[int],
    service: str | None = None,
    endpoint: str | None = None,
) -> list[Connection]:
    """The node's live flows of kproxy's services, in `mode`, narrowed as asked."""
    wanted, endpoint_ip = parse_service(service), parse_endpoint_ip(endpoint)
    services, endpoints = state.services_map(), state.endpoints_map()
    if wanted is not None:
        services = {n: sp for n, sp in services.items() if n.service == wanted}
        if not services:
            raise ConnectionsInputError(f"service {wanted} has no port kproxy serves here")
    index = build_index(services, endpoints)
    families = [f for f in service_families(services) if f in families]
    protocols = {sp.protocol for sp in services.values()}
    addresses = watched_addresses(index, local)
    flows = read_flows(families, protocols, addresses) if services else []
    userspace = mode == "userspace"
    return select_connections(flows, index, local, userspace, wanted, endpoint_ip)


def show_connections(
    service: str | None,
    manifests_paths: Sequence[str],
    kubeconfig: str | None,
    endpoint: str | None,
    output: str,
    config_path: str | None,
    hostname: str | None,
) -> str:
    """`kproxy connections`: the services from the manifests or the API server, the flows from
    this node's conntrack, read in the mode the node runs."""
    config = load_config_file(config_path)
    if manifests_paths:
        manifests = read_all_manifests(manifests_paths)
    else:
        manifests = read_cluster_objects(kubeconfig, config, hostname)
    state = build_state(manifests, config)
    config = in_live_mode(config, config_path, 4)
    found = live_connections(
        state, local_addresses(), config.mode, node_families(), service, endpoint
    )
    return render(found, config.mode, output)


def connections_json(connections: Sequence[Connection], mode: str) -> dict[str, Any]:
    """Grouped by service port and endpoint, each group's flows in order."""
    groups: list[dict[str, Any]] = []
    for conn in connections:
        head = {
            "service": str(conn.service.service),
            "port": conn.service.port,
            "protocol": conn.service.protocol.value,
            "endpoint": conn.endpoint,
        }
        if not groups or {k: groups[-1][k] for k in head} != head:
            groups.append({**head, "flows": []})
        groups[-1]["flows"].append(_flow_json(conn))
    return {"mode": mode, "groups": groups}


def _flow_json(conn: Connection) -> dict[str, Any]:
    f = conn.flow
    return {
        "client": _hostport(f.src, f.sport),
        "destination": _hostport(f.dst, f.dport),
        "via": conn.via,
        "leg": conn.leg,
        "replyFrom": _hostport(f.reply_src, f.reply_sport),
        "state": f.state,
        "timeoutSeconds": f.timeout,
        "ageSeconds": None if f.age is None else round(f.age, 1),
        "id": f.id,
    }


def render(connections: Sequence[Connection], mode: str, output: str) -> str:
    """`--output json` or text."""
    if output == "json":
        return json.dumps(connections_json(connections, mode), indent=2) + "\n"
    return render_connections(connections, mode)


def render_connections(connections: Sequence[Connection], mode: str) -> str:
    """A readable table: a heading per service port and endpoint, a line per flow."""
    doc = connections_json(connections, mode)
    if not doc["groups"]:
        return "no live connections of kproxy's services\n"
    lines: list[str] = []
    for group in doc["groups"]:
        name = group["service"] + (f":{group['port']}" if group["port"] else "")
        endpoint = group["endpoint"] or "(endpoint not in conntrack: the relay's client side)"
        count = len(group["flows"])
        lines.append(f"{name} {group['protocol']} -> {endpoint}  ({count} flow{'s' * (count > 1)})")
        for flow in group["flows"]:
            age = "-" if flow["ageSeconds"] is None else f"{flow['ageSeconds']:.0f}s"
            lines.append(
                f"  {flow['client']:<24} -> {flow['destination']:<24} {flow['via']:<14} "
                f"{flow['leg']:<10} {flow['state']:<12} timeout {flow['timeoutSeconds']}s "
                f"age {age}"
            )
    return "\n".join(lines) + "\n"
