"""`kproxy trace`: which tables to walk (the node's live ones, or what kproxy would write for
some manifests), which chains the origin decides (a pod or a client outside: nat PREROUTING;
the node itself: nat OUTPUT), and the packet."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kproxy.errors import KproxyError
from kproxy.inspect.inputs import (
    build_state,
    in_live_mode,
    load_config_file,
    local_addresses,
    node_and_config,
    read_all_manifests,
    resolve_hostname,
)
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.rules.explain import Explanation, Traceable
from kproxy.rules.trace import Hook, Packet, TraceError
from kproxy.state.cluster import ClusterState
from kproxy.sync.modes import proxy_mode

PROTOCOLS = ("tcp", "udp", "sctp")


class TraceInputError(KproxyError):
    """The packet to trace is not one the tables can be asked about."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    protocol: str
    destination: str  # `ip:port`, `[ipv6]:port`
    source: str | None = None  # None: the node itself
    in_interface: str | None = None


def parse_destination(text: str) -> tuple[str, int]:
    """`10.0.0.1:80` or `[fd00::1]:80` -> (address, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":")
    example = "expected ADDRESS:PORT, e.g. 10.96.0.10:53 or [fd00::a]:53"
    if not host:
        raise TraceInputError(f"destination {text!r}: {example}")
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise TraceInputError(
            f"destination {text!r}: {host!r} is not an IP address ({example})"
        ) from None
    try:
        number = int(port)
    except ValueError:
        raise TraceInputError(f"destination {text!r}: {port!r} is not a port number") from None
    if not 0 < number < 65536:
        raise TraceInputError(f"destination {text!r}: port {number} is not 1-65535")
    return address, number


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def request_family(request: TraceRequest) -> int:
    """4 or 6: the family of the request's destination."""
    return _family(parse_destination(request.destination)[0])


def _in_any(address: str, cidrs: Iterable[str]) -> bool:
    ip = ipaddress.ip_address(address)
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version == ip.version and ip in net:
            return True
    return False


def node_source(local_addresses: Sequence[str], family: int) -> str:
    """The source the node's own connection gets: its first address of the family that is
    not loopback (the kernel picks by route; for a VIP that is the default route's)."""
    for address in local_addresses:
        ip = ipaddress.ip_address(address)
        if ip.version == family and not ip.is_loopback and not ip.is_link_local:
            return str(ip)
    return "127.0.0.1" if family == 4 else "::1"


def plan_origin(
    request: TraceRequest,
    local_addresses: Sequence[str],
    pod_ranges: Sequence[str],
    endpoints: set[str],
) -> tuple[Hook, str, str]:
    """(hook, source address, origin): the node itself when the source is omitted or one of its
    addresses; else a pod (in the pod ranges, or an endpoint) or a client outside."""
    dst, _ = parse_destination(request.destination)
    family = _family(dst)
    if request.source is None:
        return "OUTPUT", node_source(local_addresses, family), "node"
    try:
        src = str(ipaddress.ip_address(request.source))
    except ValueError:
        raise TraceInputError(f"--from {request.source!r} is not an IP address") from None
    if _family(src) != family:
        raise TraceInputError(f"--from {src} and {dst} are of different families")
    if src in {str(ipaddress.ip_address(a)) for a in local_addresses}:
        return "OUTPUT", src, "node"
    origin = "pod" if src in endpoints or _in_any(src, pod_ranges) else "outside"
    return "PREROUTING", src, origin


def explain(
    request: TraceRequest,
    tables: Traceable,
    local_addresses: Sequence[str],
    pod_ranges: Sequence[str] = (),
) -> Explanation:
    """Trace the request through one family's tables."""
    if request.protocol.lower() not in PROTOCOLS:
        raise TraceInputError(f"protocol {request.protocol!r}: use tcp, udp or sctp")
    dst, port = parse_destination(request.destination)
    hook, src, origin = plan_origin(
        request, local_addresses, pod_ranges, tables.endpoint_addresses()
    )
    in_iface = request.in_interface if hook == "PREROUTING" else None
    packet = Packet(src, dst, request.protocol.lower(), port, in_iface=in_iface)
    try:
        return tables.explain(packet, hook, origin, local_addresses)
    except TraceError as exc:
        raise TraceInputError(f"cannot trace: {exc}") from exc


def trace_live(
    request: TraceRequest,
    config: ProxyConfig,
    local_addresses: Sequence[str],
    node: NodeInfo,
    lock_timeout: float,
) -> Explanation:
    """Through the kernel's tables of this network namespace, in the mode the node runs."""
    family = _family(parse_destination(request.destination)[0])
    tables = proxy_mode(config).trace_live(family, lock_timeout)
    return explain(request, tables, local_addresses, (*config.cluster_cidrs, *node.pod_cidrs))


def trace_planned(
    request: TraceRequest, state: ClusterState, node: NodeInfo, config: ProxyConfig
) -> Explanation:
    """Through what kproxy would write for `state` on `node` (its local_addresses included)."""
    family = _family(parse_destination(request.destination)[0])
    mode = proxy_mode(config)
    plan = mode.planner(config).plan(state.services_map(), state.endpoints_map(), node, (family,))
    tables = mode.trace_plan(plan, family)
    pod_ranges = (*config.cluster_cidrs, *node.pod_cidrs)
    return explain(request, tables, node.local_addresses, pod_ranges)


def trace_request(
    request: TraceRequest,
    manifests_paths: Sequence[str],
    node_addresses: Sequence[str],
    lock_timeout: float,
    config_path: str | None,
    hostname: str | None,
) -> Explanation:
    """`kproxy trace`: through what kproxy would write for the manifests, if given; else through
    the live tables, in the mode the node runs (detected when no --config is given)."""
    if manifests_paths:
        manifests = read_all_manifests(manifests_paths)
        node, config = node_and_config(manifests, config_path, hostname)
        state = build_state(manifests, config)
        local = tuple(node_addresses) or local_addresses()
        node = dataclasses.replace(node, local_addresses=local)
        return trace_planned(request, state, node, config)
    config = load_config_file(config_path)
    config = in_live_mode(config, config_path, request_family(request))
    local = tuple(node_addresses) or local_addresses()
    node = NodeInfo(name=resolve_hostname(hostname, config))
    return trace_live(request, config, local, node, lock_timeout)
