"""The portal rules in front of the userspace mode's listeners, as a pure function of the
listeners and the proxy ports they got when bound (known only after binding).

Chains, jump positions, match order, targets and comments follow upstream kube-proxy's userspace
proxier, so either implementation's cleanup removes the other's rules.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from kproxy.model.addresses import ip_family
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import Protocol, ServicePortName
from kproxy.plan.userspace import chains as c
from kproxy.rules import fragments as f
from kproxy.rules.ir import Chain, JumpRule, Match, Opt, Rule, Ruleset, Table, Target
from kproxy.rules.trace import host_port

WILDCARD = {4: "0.0.0.0", 6: "::"}


class Scope(enum.Enum):
    """Which of a service port's addresses a listener serves. A service port has one listener
    (ALL) unless its two traffic policies choose different endpoints: then ClusterIP traffic
    (INTERNAL) and NodePort/externalIP/LB traffic (EXTERNAL) get a listener each, so that the
    portal a connection came through decides its endpoints, for TCP and UDP alike."""

    ALL = "all"
    INTERNAL = "internal"
    EXTERNAL = "external"


# What a bound proxy port is known by: the service port and the scope of its listener.
ListenerKey = tuple[ServicePortName, Scope]


@dataclass(frozen=True, slots=True)
class Listener:
    """One proxy socket: a service port of one family, where it binds and where it sends."""

    name: ServicePortName
    family: int
    bind_address: str  # the family's wildcard, or bindAddress
    cluster_ip: str
    port: int
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    node_port: int = 0
    # Chosen by plan/endpoints.py as the iptables mode chooses them: ClusterIP traffic follows
    # internalTrafficPolicy, NodePort/externalIP/LB traffic externalTrafficPolicy.
    endpoints: tuple[Endpoint, ...] = ()
    scope: Scope = Scope.ALL
    affinity_seconds: int | None = None  # ClientIP affinity timeout; None for no affinity
    # loadBalancerSourceRanges of this family (none: every source), for the LB IPs only.
    source_ranges: tuple[str, ...] = ()
    # (address, port) sockets held but never served, so nothing else takes a port a portal
    # answers on: "" is every address (NodePorts).
    held_ports: tuple[tuple[str, int], ...] = ()

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol

    @property
    def key(self) -> ListenerKey:
        return (self.name, self.scope)

    @property
    def serves_internal(self) -> bool:
        return self.scope is not Scope.EXTERNAL

    @property
    def serves_external(self) -> bool:
        return self.scope is not Scope.INTERNAL


def is_wildcard(address: str) -> bool:
    return address in ("", *WILDCARD.values())


def host_ip(node: NodeInfo, config: ProxyConfig, family: int) -> str | None:
    """The node address portals DNAT to: bindAddress when set, else the node's primary address
    of the family (upstream: the default route's interface) when this node holds it, else its
    first local address that is neither loopback nor link-local. None when there is none."""
    if not is_wildcard(config.bind_address):
        return config.bind_address if ip_family(config.bind_address) == family else None
    local = set(node.local_addresses)
    primary = [a for a in node.primary_ips if not local or a in local]
    for address in (*primary, *node.local_addresses):
        if ip_family(address) == family and _routable(address):
            return address
    return None


def _routable(address: str) -> bool:
    """Neither loopback nor link-local: an address a DNAT can send a packet to from any
    interface (a link-local one means nothing without its interface)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified)


def _portal(
    listener: Listener,
    dport: int,
    target: Target,
    address: str | None = None,
    *extra: Match,
    source: str | None = None,
) -> Rule:
    """Upstream's common match: comment, protocol, port, [-d address], extra matches."""
    proto = listener.protocol.lower
    return Rule(
        src=f.cidr(source) if source else None,
        dst=f.cidr(address) if address else None,
        protocol=proto,
        matches=(f.comment(str(listener.name)), f.protocol_match(proto, dport), *extra),
        target=target,
    )


PHYSDEV_NOT_BRIDGED = Match("physdev", (Opt("physdev-is-in", invert=True),))
DST_LOCAL = f.addrtype("LOCAL")
NEW_STATE = Match("state", (Opt("state", "NEW"),))


NOT_NATED = f.ctstate("DNAT", invert=True)


@dataclass
class _PortalChains:
    container: list[Rule]
    host: list[Rule]
    nodeport_container: list[Rule]
    nodeport_host: list[Rule]
    non_local: list[Rule]
    # filter drops, ahead of non_local's accepts: a relay port reached without a portal's NAT,
    # and LB traffic from outside loadBalancerSourceRanges.
    drops: list[Rule]


def _container_target(listener: Listener, proxy_port: int, host: str | None) -> Target:
    """Where portals send traffic that did not start on the node (pods, other hosts).

    A specific bindAddress: DNAT to it, as upstream. The wildcard: DNAT to the host address too.
    Upstream REDIRECTed here, which rewrites the destination to the address of the interface the
    packet came in on and drops it when that interface has none: a pod on a routed network
    (Calico's, Cilium's veths) never got an answer. A node address works from every interface,
    bridged or routed; the relay answers UDP from the address each datagram was sent to, so the
    reply matches the flow's NAT whichever address that is. REDIRECT remains for a node with no
    address of the family to DNAT to, where it is all there is."""
    if not is_wildcard(listener.bind_address):
        return f.dnat(host_port(listener.bind_address, proxy_port))
    if host:
        return f.dnat(host_port(host, proxy_port))
    return Target("REDIRECT", (Opt("to-ports", str(proxy_port)),))


def _add_listener(
    out: _PortalChains, listener: Listener, proxy_port: int, host: str | None
) -> None:
    into = _container_target(listener, proxy_port, host)
    to_host = f.dnat(host_port(host, proxy_port)) if host else None
    port = listener.port
    if listener.serves_internal:
        out.container.append(_portal(listener, port, into, listener.cluster_ip))
        if to_host:
            out.host.append(_portal(listener, port, to_host, listener.cluster_ip))
    if not listener.serves_external:
        return
    for ip in listener.external_ips:
        out.container.append(_portal(listener, port, into, ip, PHYSDEV_NOT_BRIDGED))
        out.container.append(_portal(listener, port, into, ip, DST_LOCAL))
        if to_host:
            out.host.append(_portal(listener, port, to_host, ip, DST_LOCAL))
    for ip in listener.load_balancer_ips:
        for source in _allowed_sources(listener, ip, host):
            out.container.append(_portal(listener, port, into, ip, source=source))
            if to_host:
                out.host.append(_portal(listener, port, to_host, ip, source=source))
        if listener.source_ranges:
            # As the iptables mode's KUBE-PROXY-FIREWALL: what no range let through the portal
            # reaches the LB IP un-NATed (when the IP is the node's own) and is dropped.
            out.drops.append(_portal(listener, port, f.DROP, ip))
    if listener.node_port:
        out.nodeport_container.append(_portal(listener, listener.node_port, into))
        if to_host:
            out.nodeport_host.append(_portal(listener, listener.node_port, to_host))
        out.non_local.append(_portal(listener, proxy_port, f.ACCEPT, None, NEW_STATE))


def _allowed_sources(listener: Listener, lb_ip: str, host: str | None) -> tuple[str | None, ...]:
    """The `-s` of an LB IP's portals: every source (None), or one portal per source range, as
    the iptables mode's KUBE-FW chain, plus the LB IP itself when a range holds the node's address
    (an LB IP bound on the node is the source of the node's own traffic to it)."""
    ranges = listener.source_ranges
    if not ranges:
        return (None,)
    node_allowed = host is not None and any(
        ipaddress.ip_address(host) in ipaddress.ip_network(r, strict=False) for r in ranges
    )
    return (*ranges, *([lb_ip] if node_allowed else []))


def _guard(listener: Listener, proxy_port: int) -> Rule:
    """Only a portal's NAT leads to the relay: a peer dialling the proxy port straight (off the
    node, or a pod) would otherwise reach a ClusterIP-only service's endpoints from anywhere."""
    return _portal(listener, proxy_port, f.DROP, None, NOT_NATED)


def _jump(chain: str, target: str, text: str, append: bool = False, *extra: Match) -> JumpRule:
    rule = Rule(matches=(*extra, f.comment(text)), target=f.jump(target))
    return JumpRule(chain, rule, append=append)


def portal_jumps() -> tuple[tuple[JumpRule, ...], tuple[JumpRule, ...]]:
    """(nat, filter) jumps from built-in chains: the portal ones first in PREROUTING/OUTPUT, the
    NodePort ones last (an LB IP configured as a local address must hit its portal, not an
    unrelated NodePort of the same number)."""
    nat = (
        _jump("PREROUTING", c.PORTALS_CONTAINER, c.PORTALS_COMMENT),
        _jump("OUTPUT", c.PORTALS_HOST, c.PORTALS_COMMENT),
        _jump("PREROUTING", c.NODEPORT_CONTAINER, c.NODEPORTS_COMMENT, True, DST_LOCAL),
        _jump("OUTPUT", c.NODEPORT_HOST, c.NODEPORTS_COMMENT, True, DST_LOCAL),
    )
    filter_ = (_jump("INPUT", c.NODEPORT_NON_LOCAL, c.NON_LOCAL_COMMENT),)
    return nat, filter_


def build_portal_ruleset(
    listeners: tuple[Listener, ...],
    proxy_ports: Mapping[ListenerKey, int],
    node: NodeInfo,
    config: ProxyConfig,
    family: int,
) -> Ruleset:
    """The five chains and their jumps for the listeners of one family that are bound (in
    `proxy_ports`); a listener without a proxy port gets no rules."""
    host = host_ip(node, config, family)
    out = _PortalChains([], [], [], [], [], [])
    for listener in sorted(
        listeners, key=lambda lis: (str(lis.name), list(Scope).index(lis.scope))
    ):
        proxy_port = proxy_ports.get(listener.key)
        if listener.family == family and proxy_port is not None:
            out.drops.append(_guard(listener, proxy_port))
            _add_listener(out, listener, proxy_port, host)
    nat_jumps, filter_jumps = portal_jumps()
    nat = Table(
        "nat",
        (
            Chain(c.PORTALS_CONTAINER, tuple(out.container)),
            Chain(c.PORTALS_HOST, tuple(out.host)),
            Chain(c.NODEPORT_CONTAINER, tuple(out.nodeport_container)),
            Chain(c.NODEPORT_HOST, tuple(out.nodeport_host)),
        ),
        nat_jumps,
    )
    filter_table = Table(
        "filter",
        (Chain(c.NODEPORT_NON_LOCAL, (*out.drops, *out.non_local)),),
        filter_jumps,
    )
    return Ruleset(family, (filter_table, nat))
