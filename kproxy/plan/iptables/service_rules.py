"""The rules of one service port, for one address family, as upstream's iptables proxier writes
them: entry rules in the shared chains (KUBE-SERVICES, KUBE-NODEPORTS and the filter chains) and
the service's own chains (KUBE-SVC/SVL/EXT/FW and one KUBE-SEP per endpoint)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.service import ServicePort, ServicePortName
from kproxy.plan.iptables import chains as c
from kproxy.plan.iptables import naming
from kproxy.plan.local_traffic import LocalDetector
from kproxy.plan.port_policy import PortView, decide_port_policy, view_port
from kproxy.rules import fragments as f
from kproxy.rules.ir import Chain, Match, Rule, Target


@dataclass(frozen=True, slots=True)
class PlanContext:
    """What every service port's rules depend on besides the port itself."""

    family: int
    config: ProxyConfig
    node_name: str
    zone: str
    detector: LocalDetector
    large_cluster: bool
    node_ip: str | None  # this family's primary node IP, for loadBalancerSourceRanges


@dataclass
class SharedChains:
    """Rules accumulated for the chains all services share, plus the per-service chains."""

    nat_services: list[Rule] = field(default_factory=list)
    nat_nodeports: list[Rule] = field(default_factory=list)
    filter_services: list[Rule] = field(default_factory=list)
    filter_external: list[Rule] = field(default_factory=list)
    filter_nodeports: list[Rule] = field(default_factory=list)
    filter_firewall: list[Rule] = field(default_factory=list)
    service_chains: list[Chain] = field(default_factory=list)
    no_local_internal: int = 0
    no_local_external: int = 0


@dataclass(frozen=True, slots=True)
class _Port:
    """One service port seen from one family (its PortView), with the names its rules use."""

    view: PortView
    sep_names: dict[Endpoint, str] = field(default_factory=dict, compare=False)
    # Each (address, comment, port)'s destination and matches, made once for the port: its
    # cluster IP's rule in KUBE-SERVICES and the masquerade rule in its chain share them.
    pieces: dict[tuple[str, str, int | None], tuple[str, tuple[Match, ...]]] = field(
        default_factory=dict, compare=False
    )

    @property
    def sp(self) -> ServicePort:
        return self.view.sp

    @property
    def spn(self) -> ServicePortName:
        return self.sp.name

    @property
    def text(self) -> str:
        """`namespace/name:port`, as comments write it."""
        return naming.spn_text(self.sp.name)

    def endpoint_chain(self, ep: Endpoint) -> str:
        """The endpoint's KUBE-SEP name, hashed once per plan of this port."""
        name = self.sep_names.get(ep)
        if name is None:
            name = self.sep_names[ep] = naming.endpoint_chain(self.sp.name, ep)
        return name

    @property
    def proto(self) -> str:
        return self.sp.name.protocol.lower

    def to(self, address: str, text: str, target: Target, port: int | None = None) -> Rule:
        """`-d address -p proto -m comment -m proto --dport port -j target`."""
        key = (address, text, port)
        pieces = self.pieces.get(key)
        if pieces is None:
            matches = (f.comment(text), f.protocol_match(self.proto, port or self.sp.port))
            pieces = self.pieces[key] = (f.cidr(address), matches)
        return Rule(dst=pieces[0], protocol=self.proto, matches=pieces[1], target=target)


def plan_service_port(
    ctx: PlanContext, sp: ServicePort, endpoints: tuple[Endpoint, ...], out: SharedChains
) -> None:
    """Add the rules of one service port to `out`."""
    view = view_port(sp, ctx.family)
    if view is None:
        return
    port = _Port(view)
    itp_local = sp.internal_policy_local
    policy = decide_port_policy(view, endpoints, ctx.node_name, ctx.zone)
    cats, uses_cluster, uses_local = policy.cats, policy.uses_cluster, policy.uses_local
    has_internal, has_external = policy.has_internal, policy.has_external
    out.no_local_internal += policy.no_local_internal
    out.no_local_external += policy.no_local_external
    internal_chain = (naming.local_service_chain if itp_local else naming.service_chain)(port.spn)
    uses_fw = policy.uses_firewall

    _entry_rules(ctx, port, cats.has_any, has_internal, has_external, internal_chain, uses_fw, out)
    masq = _clusterip_masquerade(ctx, port) if has_internal else None
    if cats.has_any and port.view.externally_accessible:
        out.service_chains.append(_external_chain(ctx, port, has_external))
    if uses_fw:
        out.service_chains.append(_firewall_chain(ctx, port))
    for chain_name, eps, wanted in (
        (naming.service_chain(port.spn), cats.cluster, uses_cluster),
        (naming.local_service_chain(port.spn), cats.local, uses_local),
    ):
        if eps and wanted:
            head = (masq,) if masq is not None and chain_name == internal_chain else ()
            out.service_chains.append(Chain(chain_name, head + _balance(ctx, port, eps)))
    if cats.reachable:
        text = _endpoint_comment(ctx, port.text)  # the same for each of the port's endpoints
        dnat_matches = (*text, f.protocol_match(port.proto))
        out.service_chains.extend(
            _endpoint_chain(ctx, port, ep, text, dnat_matches) for ep in cats.reachable
        )


def _filter_verdict(ctx: PlanContext, name: str, has_any: bool) -> tuple[str, Target]:
    if not has_any:
        return f"{name} has no endpoints", f.reject(ctx.family)
    return f"{name} has no local endpoints", f.DROP


def _entry_rules(
    ctx: PlanContext,
    port: _Port,
    has_any: bool,
    has_internal: bool,
    has_external: bool,
    internal_chain: str,
    uses_fw: bool,
    out: SharedChains,
) -> None:
    """Rules in the shared chains that lead packets for this port's addresses into its chains,
    or reject/drop them when there is nowhere to send them."""
    spn, name = port.spn, port.text
    verdict_text, verdict = _filter_verdict(ctx, name, has_any)
    ext_chain = naming.external_chain(spn)
    if has_internal:
        out.nat_services.append(
            port.to(port.view.cluster_ip, f"{name} cluster IP", f.jump(internal_chain))
        )
    else:
        out.filter_services.append(port.to(port.view.cluster_ip, verdict_text, verdict))
    for ip in port.view.external_ips:
        if has_any:
            out.nat_services.append(port.to(ip, f"{name} external IP", f.jump(ext_chain)))
        if not has_external:
            out.filter_external.append(port.to(ip, verdict_text, verdict))
    lb_chain = naming.firewall_chain(spn) if uses_fw else ext_chain
    for ip in port.view.lb_ips:
        if has_any:
            out.nat_services.append(port.to(ip, f"{name} loadbalancer IP", f.jump(lb_chain)))
        if uses_fw:
            text = f"{name} traffic not accepted by {naming.firewall_chain(spn)}"
            out.filter_firewall.append(port.to(ip, text, f.DROP))
    if not has_external:
        out.filter_external.extend(port.to(ip, verdict_text, verdict) for ip in port.view.lb_ips)
    _node_port_rules(port, has_any, has_external, verdict_text, verdict, out)


def _node_port_rules(
    port: _Port,
    has_any: bool,
    has_external: bool,
    verdict_text: str,
    verdict: Target,
    out: SharedChains,
) -> None:
    sp, proto = port.sp, port.proto
    if sp.node_port:
        if has_any:
            out.nat_nodeports.append(
                Rule(
                    protocol=proto,
                    matches=(f.comment(port.text), f.protocol_match(proto, sp.node_port)),
                    target=f.jump(naming.external_chain(port.spn)),
                )
            )
        if not has_external:
            out.filter_external.append(
                Rule(
                    protocol=proto,
                    matches=(
                        f.comment(verdict_text),
                        f.addrtype(dst_type="LOCAL"),
                        f.protocol_match(proto, sp.node_port),
                    ),
                    target=verdict,
                )
            )
    if sp.health_check_node_port:
        out.filter_nodeports.append(
            Rule(
                protocol="tcp",
                matches=(
                    f.comment(f"{port.text} health check node port"),
                    f.protocol_match("tcp", sp.health_check_node_port),
                ),
                target=f.ACCEPT,
            )
        )


def _clusterip_masquerade(ctx: PlanContext, port: _Port) -> Rule | None:
    """First rule of the internal chain: masquerade everything (masqueradeAll) or what does not
    come from pods (a local-traffic detector is configured); else none."""
    name = port.text
    rule = port.to(port.view.cluster_ip, f"{name} cluster IP", f.jump(c.KUBE_MARK_MASQ))
    if ctx.config.masquerade_all:
        return rule
    detector = ctx.detector
    if detector.source_cidr is not None:
        return replace(rule, src=detector.source_cidr, src_invert=True)
    if detector.in_iface is not None:
        return replace(rule, in_iface=detector.in_iface, in_invert=True)
    return None


def _external_chain(ctx: PlanContext, port: _Port, has_external: bool) -> Chain:
    """KUBE-EXT: masquerade (Cluster policy) or short-circuit pod and host traffic (Local)."""
    spn, name = port.spn, port.text
    svc = f.jump(naming.service_chain(spn))
    mark = f.jump(c.KUBE_MARK_MASQ)
    rules: list[Rule] = []
    if not port.sp.external_policy_local:
        text = f"masquerade traffic for {name} external destinations"
        rules.append(Rule(matches=(f.comment(text),), target=mark))
    else:
        detector = ctx.detector
        if detector.implemented:
            pod_text = f"pod traffic for {name} external destinations"
            rules.append(
                Rule(
                    src=detector.source_cidr,
                    in_iface=detector.in_iface,
                    matches=(f.comment(pod_text),),
                    target=svc,
                )
            )
        src_local = f.addrtype(src_type="LOCAL")
        masq_text = f"masquerade LOCAL traffic for {name} external destinations"
        route_text = f"route LOCAL traffic for {name} external destinations"
        rules.append(Rule(matches=(f.comment(masq_text), src_local), target=mark))
        rules.append(Rule(matches=(f.comment(route_text), src_local), target=svc))
    if has_external:
        local = port.sp.external_policy_local
        policy_chain = naming.local_service_chain(spn) if local else naming.service_chain(spn)
        rules.append(Rule(target=f.jump(policy_chain)))
    return Chain(naming.external_chain(spn), tuple(rules))


def _firewall_chain(ctx: PlanContext, port: _Port) -> Chain:
    """KUBE-FW: let allowed sources on to KUBE-EXT; the rest falls through, undNATed, to the
    filter table's KUBE-PROXY-FIREWALL DROP."""
    spn, name = port.spn, port.text
    ext = f.jump(naming.external_chain(spn))
    text = (f.comment(f"{name} loadbalancer IP"),)
    rules = [Rule(src=r, matches=text, target=ext) for r in port.view.source_ranges]
    node_ip = ctx.node_ip
    if node_ip is not None and any(
        ipaddress.ip_address(node_ip) in ipaddress.ip_network(r) for r in port.view.source_ranges
    ):
        # A VIP bound on the node makes node-originated traffic carry the VIP as its source.
        rules.extend(Rule(src=f.cidr(ip), matches=text, target=ext) for ip in port.view.lb_ips)
    last = f"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
    rules.append(Rule(matches=(f.comment(last),)))
    return Chain(naming.firewall_chain(spn), tuple(rules))


def _endpoint_comment(ctx: PlanContext, text: str) -> tuple[Match, ...]:
    return () if ctx.large_cluster else (f.comment(text),)


def _balance(ctx: PlanContext, port: _Port, endpoints: tuple[Endpoint, ...]) -> tuple[Rule, ...]:
    """Affinity checks, then one probability rule per endpoint, the last unconditional."""
    name, affinity = port.text, port.sp.session_affinity_seconds
    chains = [port.endpoint_chain(ep) for ep in endpoints]
    rules = []
    if affinity is not None:
        for ep, sep in zip(endpoints, chains, strict=True):
            check = f.recent_check(sep, affinity, ctx.family)
            text = _endpoint_comment(ctx, f"{name} -> {ep}")
            rules.append(Rule(matches=(*text, check), target=f.jump(sep)))
    n = len(endpoints)
    for i, (ep, sep) in enumerate(zip(endpoints, chains, strict=True)):
        stat = f.statistic_matches(n - i) if i < n - 1 else ()
        text = _endpoint_comment(ctx, f"{name} -> {ep}")
        rules.append(Rule(matches=text + stat if text else stat, target=f.jump(sep)))
    return tuple(rules)


def _endpoint_chain(
    ctx: PlanContext,
    port: _Port,
    ep: Endpoint,
    text: tuple[Match, ...],
    dnat_matches: tuple[Match, ...],
) -> Chain:
    """KUBE-SEP: masquerade hairpin traffic, remember the client for affinity, DNAT. `text`
    and `dnat_matches` (text and the protocol match, without affinity) are the port's, shared
    by its endpoints' rules."""
    sep = port.endpoint_chain(ep)
    if port.sp.session_affinity_seconds is not None:
        dnat_matches = (*text, f.recent_set(sep, ctx.family), *dnat_matches[len(text) :])
    return Chain(
        sep,
        (
            Rule(src=f.cidr(ep.ip), matches=text, target=f.jump(c.KUBE_MARK_MASQ)),
            Rule(protocol=port.proto, matches=dnat_matches, target=f.dnat(str(ep))),
        ),
    )
