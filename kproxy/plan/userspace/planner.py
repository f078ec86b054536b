"""The userspace mode's planner: services, endpoints and the node -> a NodePlan whose kernel part
is, per family, the listeners wanted and the portal rules as a function of their bound proxy
ports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from kproxy.errors import ConfigError
from kproxy.model.addresses import ip_family
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.model.service import Protocol, ServicePortName
from kproxy.plan.addresses import of_family
from kproxy.plan.node_plan import FamilyPlanner, NodePlan, PlanInput, assemble_node_plan
from kproxy.plan.port_policy import PortPolicy, PortView, decide_port_policy, view_port
from kproxy.plan.userspace.portals import (
    WILDCARD,
    Listener,
    ListenerKey,
    Scope,
    build_portal_ruleset,
    host_ip,
    is_wildcard,
)
from kproxy.plan.xtables import count_rules
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
    port: PortView, policy: PortPolicy, bind_address: str, node: NodeInfo
) -> tuple[Listener, ...]:
    """One listener for the service port, or two when its traffic policies choose different
    endpoints for ClusterIP and for external traffic (upstream's userspace mode ignored
    externalTrafficPolicy; the iptables mode honours it, and so does this one)."""
    sp = port.sp
    listener = Listener(
        name=sp.name,
        family=port.family,
        bind_address=bind_address,
        cluster_ip=port.cluster_ip,
        port=sp.port,
        external_ips=port.external_ips,
        load_balancer_ips=port.lb_ips,
        node_port=sp.node_port,
        endpoints=policy.internal,
        affinity_seconds=sp.session_affinity_seconds,
        source_ranges=port.source_ranges,
    )
    scoped: tuple[Listener, ...] = (listener,)
    if port.externally_accessible and sp.internal_policy_local != sp.external_policy_local:
        scoped = (
            replace(listener, scope=Scope.INTERNAL),
            replace(listener, scope=Scope.EXTERNAL, endpoints=policy.external),
        )
    return tuple(replace(lis, held_ports=_held_ports(lis, node)) for lis in scoped)


def bind_address(config: ProxyConfig, family: int) -> str | None:
    """Where one family's listeners bind: the family's wildcard, or bindAddress when it is of
    this family; None when bindAddress is of the other family (upstream proxied one family)."""
    if is_wildcard(config.bind_address):
        return WILDCARD[family]
    return config.bind_address if ip_family(config.bind_address) == family else None


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


@dataclass(frozen=True, slots=True)
class _FamilyListeners:
    listeners: tuple[Listener, ...]
    no_local_internal: int = 0
    no_local_external: int = 0


@dataclass
class UserspacePlanner(FamilyPlanner[UserspaceKernel, _FamilyListeners]):
    config: ProxyConfig

    def __post_init__(self) -> None:
        if self.config.bind_address in ("127.0.0.1", "::1"):
            raise ConfigError("cannot proxy on localhost: set another address", "bindAddress")

    def plan_family(self, given: PlanInput, family: int) -> _FamilyListeners:
        address = bind_address(self.config, family)
        if address is None:
            return _FamilyListeners(())
        listeners: list[Listener] = []
        no_local = [0, 0]
        for spn in sorted(given.services, key=str):
            sp = given.services[spn]
            port = view_port(sp, family)
            if sp.protocol is Protocol.SCTP or port is None:
                continue
            node = given.node
            policy = decide_port_policy(port, given.endpoints.get(spn, ()), node.name, node.zone)
            no_local[0] += policy.no_local_internal
            no_local[1] += policy.no_local_external and port.externally_accessible
            listeners.extend(plan_listeners(port, policy, address, node))
        return _FamilyListeners(tuple(listeners), *no_local)

    def assemble(self, given: PlanInput, planned: Mapping[int, _FamilyListeners]) -> UserspacePlan:
        node, config = given.node, self.config
        skipped = tuple(
            SkippedPort(spn, SCTP_REASON)
            for spn in sorted(given.services, key=str)
            if spn.protocol is Protocol.SCTP
        )
        parts = {f: UserspaceFamily(f, p.listeners, node, config) for f, p in planned.items()}
        serving = {f: portal_serving(p.listeners, node, config, f) for f, p in parts.items()}
        kernel = UserspaceKernel(parts, skipped)
        rules = _rule_counts(parts)
        return assemble_node_plan(MODE, kernel, given, planned.values(), rules, udp_serving=serving)


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
