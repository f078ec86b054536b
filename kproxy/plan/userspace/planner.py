"""The userspace mode's planner: services, endpoints and the node -> a NodePlan whose kernel part
is, per family, the listeners wanted and the portal rules as a function of their bound proxy
ports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from kproxy.errors import ConfigError
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import Protocol, ServicePort, ServicePortName
from kproxy.plan.endpoints import categorize_endpoints
from kproxy.plan.iptables.planner import count_rules, health_check_addresses
from kproxy.plan.iptables.service_rules import of_family
from kproxy.plan.node_plan import NodePlan, PlanStats, plan_health_checks
from kproxy.plan.port_policy import view_port
from kproxy.plan.userspace.portals import (
    WILDCARD,
    Listener,
    ListenerKey,
    Scope,
    build_portal_ruleset,
    host_ip,
    is_wildcard,
)
from kproxy.rules.ir import Ruleset
from kproxy.rules.render import render_ruleset

MODE = "userspace"
SCTP_REASON = "SCTP is not supported by the userspace mode"


@dataclass(frozen=True, slots=True)
class SkippedPort:
    """A service port the mode does not proxy, and why: the caller warns once per port."""

    name: ServicePortName
    reason: str


@dataclass(frozen=True)
class UserspaceFamily:
    """One family's part: the listeners to open, and their portal rules once bound."""

    family: int
    listeners: tuple[Listener, ...]
    node: NodeInfo
    config: ProxyConfig

    def ruleset(self, proxy_ports: Mapping[ListenerKey, int]) -> Ruleset:
        return build_portal_ruleset(
            self.listeners, proxy_ports, self.node, self.config, self.family
        )


@dataclass(frozen=True)
class UserspaceKernel:
    families: Mapping[int, UserspaceFamily]
    skipped: tuple[SkippedPort, ...] = ()


UserspacePlan = NodePlan[UserspaceKernel]


@dataclass(frozen=True, slots=True)
class _Selection:
    internal: tuple[Endpoint, ...]
    external: tuple[Endpoint, ...]
    exposed: bool  # has a NodePort, externalIPs or LB IPs of this family
    no_local_internal: bool
    no_local_external: bool


def select_endpoints(
    sp: ServicePort, endpoints: tuple[Endpoint, ...], node: NodeInfo, family: int
) -> _Selection:
    """The iptables mode's choice (plan_service_port): which endpoints ClusterIP traffic and
    external traffic reach, from the same categorize_endpoints call."""
    externally = bool(
        sp.node_port
        or of_family(sp.external_ips, family)
        or of_family(sp.load_balancer_ips, family)
    )
    itp_local, etp_local = sp.internal_policy_local, sp.external_policy_local
    cats = categorize_endpoints(
        [ep for ep in endpoints if ep.family == family],
        node.name,
        node.zone,
        uses_cluster=not itp_local or externally,
        uses_local=itp_local or (etp_local and externally),
    )
    internal = cats.local if itp_local else cats.cluster
    external = (cats.local if etp_local else cats.cluster) if externally else ()
    return _Selection(
        internal,
        external,
        externally,
        cats.has_any and itp_local and not cats.local,
        cats.has_any and externally and etp_local and not cats.local,
    )


def _held_ports(listener: Listener, node: NodeInfo) -> tuple[tuple[str, int], ...]:
    """Upstream holds a NodePort on every address, and a portal port on a portal IP that is one
    of the node's addresses."""
    held = [("", listener.node_port)] if listener.node_port and listener.serves_external else []
    local = set(node.local_addresses)
    ips = [listener.cluster_ip] if listener.serves_internal else []
    if listener.serves_external:
        ips += [*listener.external_ips, *listener.load_balancer_ips]
    for ip in ips:
        if ip in local and (ip, listener.port) not in held:
            held.append((ip, listener.port))
    return tuple(held)


def plan_listeners(
    sp: ServicePort, selection: _Selection, bind_address: str, node: NodeInfo, family: int
) -> tuple[Listener, ...]:
    """One listener for the service port, or two when its traffic policies choose different
    endpoints for ClusterIP and for external traffic (upstream's userspace mode ignored
    externalTrafficPolicy; the iptables mode honours it, and so does this one)."""
    cluster_ips = of_family(sp.cluster_ips, family)
    if not cluster_ips:
        return ()  # headless, or not of this family
    listener = Listener(
        name=sp.name,
        family=family,
        bind_address=bind_address,
        cluster_ip=cluster_ips[0],
        port=sp.port,
        external_ips=of_family(sp.external_ips, family),
        load_balancer_ips=of_family(sp.load_balancer_ips, family),
        node_port=sp.node_port,
        endpoints=selection.internal,
        affinity_seconds=sp.session_affinity_seconds,
        source_ranges=view.source_ranges if (view := view_port(sp, family)) else (),
    )
    scoped: tuple[Listener, ...] = (listener,)
    if selection.exposed and sp.internal_policy_local != sp.external_policy_local:
        scoped = (
            replace(listener, scope=Scope.INTERNAL),
            replace(listener, scope=Scope.EXTERNAL, endpoints=selection.external),
        )
    return tuple(replace(lis, held_ports=_held_ports(lis, node)) for lis in scoped)


def bind_address(config: ProxyConfig, family: int) -> str | None:
    """Where one family's listeners bind: the family's wildcard, or bindAddress when it is of
    this family; None when bindAddress is of the other family (upstream proxied one family)."""
    if is_wildcard(config.bind_address):
        return WILDCARD[family]
    return config.bind_address if (":" in config.bind_address) == (family == 6) else None


def portal_serving(
    listeners: tuple[Listener, ...], node: NodeInfo, config: ProxyConfig, family: int
) -> dict[tuple[str, int], frozenset[str]]:
    """UDP conntrack facts for one family. A portal flow is client -> VIP, NATed to a proxy port
    on the node, so its reply comes from a node address (the bind or host address portals DNAT
    to; REDIRECT, on a node without one: the incoming interface's), never from an endpoint. A
    UDP flow to a portal whose reply comes from anything else (an iptables-mode DNAT to a pod,
    left from before a mode switch) is stale. Without the node's addresses nothing is called
    stale."""
    if not node.local_addresses:
        return {}
    sources = set(of_family(node.local_addresses, family))
    sources.update(a for a in (host_ip(node, config, family), config.bind_address) if a)
    allowed = frozenset(sources)
    serving: dict[tuple[str, int], frozenset[str]] = {}
    for lis in listeners:
        if lis.protocol is not Protocol.UDP:
            continue
        for ip in (lis.cluster_ip, *lis.external_ips, *lis.load_balancer_ips):
            serving[(ip, lis.port)] = allowed
        if lis.node_port:
            serving[("*", lis.node_port)] = allowed
    return serving


@dataclass
class UserspacePlanner:
    config: ProxyConfig

    def __post_init__(self) -> None:
        if self.config.bind_address in ("127.0.0.1", "::1"):
            raise ConfigError("cannot proxy on localhost: set another address", "bindAddress")

    def plan(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
        node: NodeInfo,
        families: tuple[int, ...],
    ) -> UserspacePlan:
        skipped = tuple(
            SkippedPort(spn, SCTP_REASON)
            for spn in sorted(services, key=str)
            if spn.protocol is Protocol.SCTP
        )
        parts: dict[int, UserspaceFamily] = {}
        no_local = [0, 0]
        for family in families:
            listeners = self._listeners(services, endpoints, node, family, no_local)
            parts[family] = UserspaceFamily(family, listeners, node, self.config)
        return NodePlan(
            mode=MODE,
            kernel=UserspaceKernel(parts, skipped),
            families=families,
            health_check_addresses=health_check_addresses(self.config, node),
            health_checks=plan_health_checks(services, endpoints, node),
            udp_serving={
                f: portal_serving(p.listeners, node, self.config, f) for f, p in parts.items()
            },
            stats=PlanStats(no_local[0], no_local[1], _rule_counts(parts)),
        )

    def _listeners(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
        node: NodeInfo,
        family: int,
        no_local: list[int],
    ) -> tuple[Listener, ...]:
        address = bind_address(self.config, family)
        if address is None:
            return ()
        listeners: list[Listener] = []
        for spn in sorted(services, key=str):
            sp = services[spn]
            if sp.protocol is Protocol.SCTP or not of_family(sp.cluster_ips, family):
                continue
            selection = select_endpoints(sp, endpoints.get(spn, ()), node, family)
            no_local[0] += selection.no_local_internal
            no_local[1] += selection.no_local_external
            listeners.extend(plan_listeners(sp, selection, address, node, family))
        return tuple(listeners)


def _rule_counts(parts: Mapping[int, UserspaceFamily]) -> dict[str, int]:
    """Rules per table once every listener is bound (the count does not depend on the ports)."""
    rulesets = {
        family: part.ruleset({lis.key: 1 for lis in part.listeners})
        for family, part in parts.items()
    }
    return count_rules(rulesets)


def render_userspace_plan(plan: UserspacePlan, family: int) -> str:
    """One family's portal rules as `dump --manifests` prints them: the listeners are not bound
    there, so each shows proxy port 0 where the relay's port will be."""
    part = plan.kernel.families[family]
    return render_ruleset(part.ruleset({lis.key: 0 for lis in part.listeners}))
