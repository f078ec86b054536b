"""plan_ruleset: the whole desired ruleset of one address family, as a pure function of the
services, their endpoints, the node and the config. Rule order and content follow upstream
kube-proxy's iptables mode: its proxier's chain layout, jump order, comments and probabilities."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.plan.addresses import LOOPBACK, node_ip
from kproxy.plan.iptables import chains as c
from kproxy.plan.iptables.kept import PlanCache as PlanCache
from kproxy.plan.iptables.kept import SeenMaps
from kproxy.plan.iptables.service_rules import PlanContext, SharedChains
from kproxy.plan.local_traffic import build_local_detector
from kproxy.plan.node_plan import EndpointsMap, ServicePortMap
from kproxy.plan.node_ports import node_port_cidrs, node_port_ips, node_ports_match_all
from kproxy.rules import fragments as f
from kproxy.rules.ir import Chain, JumpRule, Match, Rule, Ruleset, Table

# Upstream drops per-endpoint comments once the sum of endpoints exceeds this.
LARGE_CLUSTER_ENDPOINTS = 1000

NODEPORTS_TAIL_COMMENT = (
    "kubernetes service nodeports; NOTE: this must be the last rule in this chain"
)


def _jump(chain: str, target: str, text: str | None, *extra: Match) -> JumpRule:
    comment = (f.comment(text),) if text else ()
    return JumpRule(chain, Rule(matches=(*extra, *comment), target=f.jump(target)))


def _jump_rules(
    family: int, config: ProxyConfig
) -> tuple[tuple[JumpRule, ...], tuple[JumpRule, ...]]:
    """(filter, nat) jumps from built-in chains, in upstream's order; each is inserted at the top
    of its chain, so within a chain the last listed ends up first."""
    new = f.ctstate("NEW")
    portals = "kubernetes service portals"
    external = "kubernetes externally-visible service portals"
    firewall = "kubernetes load balancer firewall"
    filter_jumps = [
        _jump("INPUT", c.KUBE_EXTERNAL_SERVICES, external, new),
        _jump("FORWARD", c.KUBE_EXTERNAL_SERVICES, external, new),
        _jump("INPUT", c.KUBE_NODEPORTS, "kubernetes health check service ports"),
        _jump("FORWARD", c.KUBE_SERVICES, portals, new),
        _jump("OUTPUT", c.KUBE_SERVICES, portals, new),
        _jump("FORWARD", c.KUBE_FORWARD, "kubernetes forwarding rules"),
        _jump("INPUT", c.KUBE_PROXY_FIREWALL, firewall, new),
        _jump("OUTPUT", c.KUBE_PROXY_FIREWALL, firewall, new),
        _jump("FORWARD", c.KUBE_PROXY_FIREWALL, firewall, new),
    ]
    if _localhost_nodeports(family, config):
        filter_jumps += [
            _jump("INPUT", c.KUBE_FIREWALL, None),
            _jump("OUTPUT", c.KUBE_FIREWALL, None),
        ]
    nat_jumps = (
        _jump("OUTPUT", c.KUBE_SERVICES, portals),
        _jump("PREROUTING", c.KUBE_SERVICES, portals),
        _jump("POSTROUTING", c.KUBE_POSTROUTING, "kubernetes postrouting rules"),
    )
    return tuple(filter_jumps), nat_jumps


def _localhost_nodeports(family: int, config: ProxyConfig) -> bool:
    return family == 4 and config.localhost_nodeports


def needs_route_localnet(config: ProxyConfig, node: NodeInfo) -> bool:
    """IPv4 NodePorts on 127.0.0.1 need net.ipv4.conf.all.route_localnet=1."""
    if not config.localhost_nodeports:
        return False
    loopback = ipaddress.ip_network(LOOPBACK[4])
    return any(
        ipaddress.ip_network(cidr).overlaps(loopback) for cidr in node_port_cidrs(config, 4, node)
    )


def _nodeports_tail(config: ProxyConfig, node: NodeInfo, family: int) -> list[Rule]:
    """The last rules of nat KUBE-SERVICES: which destinations are NodePort addresses."""
    text = f.comment(NODEPORTS_TAIL_COMMENT)
    target = f.jump(c.KUBE_NODEPORTS)
    if node_ports_match_all(config, family, node):
        exclude_loopback = family == 6 or not config.localhost_nodeports
        return [
            Rule(
                dst=LOOPBACK[family] if exclude_loopback else None,
                dst_invert=exclude_loopback,
                matches=(text, f.addrtype(dst_type="LOCAL")),
                target=target,
            )
        ]
    rules = []
    for ip in node_port_ips(config, node, family):
        if ipaddress.ip_address(ip).is_loopback and not _localhost_nodeports(family, config):
            continue  # localhost NodePorts never work on IPv6, and are off for IPv4 here
        rules.append(Rule(dst=f.cidr(ip), matches=(text,), target=target))
    return rules


def _static_nat_chains(config: ProxyConfig) -> list[Chain]:
    value = config.masquerade_value
    return [
        Chain(c.KUBE_MARK_MASQ, (Rule(target=f.set_mark(value, value)),)),
        Chain(
            c.KUBE_POSTROUTING,
            (
                Rule(matches=(f.mark(config.masquerade_mark, invert=True),), target=f.RETURN),
                Rule(target=f.set_mark(value, "0x0")),
                Rule(
                    matches=(f.comment("kubernetes service traffic requiring SNAT"),),
                    target=f.masquerade(),
                ),
            ),
        ),
    ]


def _forward_chain(config: ProxyConfig, node: NodeInfo) -> Chain:
    # With nf_conntrack_tcp_be_liberal set, INVALID packets are the admin's choice to keep.
    invalid = () if node.tcp_be_liberal else (Rule(matches=(f.ctstate("INVALID"),), target=f.DROP),)
    return Chain(
        c.KUBE_FORWARD,
        (
            *invalid,
            Rule(
                matches=(f.comment("kubernetes forwarding rules"), f.mark(config.masquerade_mark)),
                target=f.ACCEPT,
            ),
            Rule(
                matches=(
                    f.comment("kubernetes forwarding conntrack rule"),
                    f.ctstate("RELATED,ESTABLISHED"),
                ),
                target=f.ACCEPT,
            ),
        ),
    )


def _localnet_firewall() -> Chain:
    """Kubelet's martian guard for route_localnet (CVE-2020-8558), which kube-proxy also writes."""
    return Chain(
        c.KUBE_FIREWALL,
        (
            Rule(
                src=LOOPBACK[4],
                src_invert=True,
                dst=LOOPBACK[4],
                matches=(
                    f.comment("block incoming localnet connections"),
                    f.ctstate("RELATED,ESTABLISHED,DNAT", invert=True),
                ),
                target=f.DROP,
            ),
        ),
    )


def plan_ruleset(
    services: ServicePortMap,
    endpoints: EndpointsMap,
    node: NodeInfo,
    config: ProxyConfig,
    family: int = 4,
    cache: PlanCache | None = None,
    seen: SeenMaps | None = None,
) -> RulesetPlan:
    """The complete kproxy-owned ruleset for one family, with its facts for metrics. Pure: same
    input, same output (with or without a cache; `seen`: the maps' SeenMaps, when the
    caller plans them for several families)."""
    detector = build_local_detector(config, node, family)
    ip = node_ip(config, node, family)

    def context_of(endpoint_count: int) -> PlanContext:
        return PlanContext(
            family=family,
            config=config,
            node_name=node.name,
            zone=node.zone,
            detector=detector,
            large_cluster=endpoint_count > LARGE_CLUSTER_ENDPOINTS,
            node_ip=ip,
        )

    cache = cache if cache is not None else PlanCache()
    out = cache.plan(services, endpoints, family, context_of, seen)
    tables, rules = _tables(out, cache.service_chain_rules, config, node, family)
    ruleset = Ruleset(family=family, tables=tables)
    return RulesetPlan(ruleset, out.no_local_internal, out.no_local_external, rules)


def _tables(
    out: SharedChains, service_chain_rules: int, config: ProxyConfig, node: NodeInfo, family: int
) -> tuple[tuple[Table, ...], dict[str, int]]:
    """(filter, nat): the service ports' rules in the shared chains, with the fixed chains; and
    the rules of each (`service_chain_rules`: those of out.service_chains, counted already)."""
    filter_jumps, nat_jumps = _jump_rules(family, config)
    nat_fixed = (
        Chain(c.KUBE_SERVICES, (*out.nat_services, *_nodeports_tail(config, node, family))),
        Chain(c.KUBE_NODEPORTS, tuple(out.nat_nodeports)),
        *_static_nat_chains(config),
    )
    nat = Table("nat", chains=(*nat_fixed, *out.service_chains), jumps=nat_jumps)
    filter_chains = [
        Chain(c.KUBE_SERVICES, tuple(out.filter_services)),
        Chain(c.KUBE_EXTERNAL_SERVICES, tuple(out.filter_external)),
        _forward_chain(config, node),
        Chain(c.KUBE_NODEPORTS, tuple(out.filter_nodeports)),
        Chain(c.KUBE_PROXY_FIREWALL, tuple(out.filter_firewall)),
    ]
    if _localhost_nodeports(family, config):
        filter_chains.append(_localnet_firewall())
    rules = {
        "filter": len(filter_jumps) + sum(len(chain.rules) for chain in filter_chains),
        "nat": len(nat_jumps) + sum(len(chain.rules) for chain in nat_fixed) + service_chain_rules,
    }
    return (Table("filter", chains=tuple(filter_chains), jumps=filter_jumps), nat), rules


@dataclass(frozen=True, slots=True)
class RulesetPlan:
    ruleset: Ruleset
    # Service ports with a Local policy and no endpoint on this node (for metrics).
    no_local_internal: int = 0
    no_local_external: int = 0
    # Rules per table (as plan/xtables.py's count_rules counts them), counted as planned: the
    # nat table's 60,000 chains at 10,000 services cost 15 ms to walk.
    rules: Mapping[str, int] = field(default_factory=dict)


def with_canaries(ruleset: Ruleset) -> Ruleset:
    """The ruleset plus an empty canary chain in mangle, nat and filter, as kube-proxy creates
    (tools look for it to see that a proxy runs). Nothing in kproxy watches it."""
    canary = Chain(c.KUBE_PROXY_CANARY)
    tables = [replace(t, chains=(*t.chains, canary)) for t in ruleset.tables]
    if ruleset.table("mangle") is None:
        tables.append(Table("mangle", chains=(canary,)))
    return replace(ruleset, tables=tuple(tables))
