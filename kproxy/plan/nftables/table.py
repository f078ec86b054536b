"""plan_nft_table: one family's whole `kube-proxy` table, as a pure function of the services,
their endpoints, the node and the config. The layout (base chains, hooks and numeric
priorities, shared chains, sets and maps, and their names) is upstream's nftables proxier's."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.plan.addresses import LOOPBACK, ZERO_CIDR, node_ip, of_family
from kproxy.plan.local_traffic import build_local_detector
from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.ir import (
    Chain,
    CtStateNew,
    Element,
    FibLocal,
    Hook,
    Key,
    Lookup,
    MarkClear,
    MarkSet,
    Masquerade,
    Match,
    NamedSet,
    Reject,
    Rule,
    Verdict,
    Vmap,
)
from kproxy.plan.nftables.kept import NftPlanCache, TableFrame, TablePlan
from kproxy.plan.nftables.service_port import ADDRESS_TYPE, NftContext, nft_cidr
from kproxy.plan.node_plan import EndpointsMap, ServicePortMap
from kproxy.plan.node_ports import node_port_cidrs

DSTNAT = -100
SRCNAT = 100
IP_PROTO_PORT = (Key.DADDR, Key.L4PROTO, Key.DPORT)
PROTO_PORT = (Key.L4PROTO, Key.DPORT)


def _maps(family: int) -> tuple[NamedSet, ...]:
    addr = ADDRESS_TYPE[family]
    ip_port = (addr, "inet_proto", "inet_service")
    port = ("inet_proto", "inet_service")
    return (
        NamedSet(n.CLUSTER_IPS, (addr,), comment="Active ClusterIPs"),
        NamedSet(n.NODEPORT_IPS, (addr,), comment="IPs that accept NodePort traffic"),
        NamedSet(
            n.SERVICE_IPS,
            ip_port,
            verdict_map=True,
            comment="ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        NamedSet(n.SERVICE_NODEPORTS, port, verdict_map=True, comment="NodePort traffic"),
        NamedSet(
            n.NO_ENDPOINT_SERVICES,
            ip_port,
            verdict_map=True,
            comment="vmap to drop or reject packets to services with no endpoints",
        ),
        NamedSet(
            n.NO_ENDPOINT_NODEPORTS,
            port,
            verdict_map=True,
            comment="vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        NamedSet(
            n.FIREWALL_IPS,
            ip_port,
            verdict_map=True,
            comment="destinations that are subject to LoadBalancerSourceRanges",
        ),
    )


def _jump_if_new(chain: str) -> Rule:
    return Rule((CtStateNew(), Verdict("jump", chain)))


def _filter_chain(name: str, hook: str, *checks: str, priority: int = DSTNAT - 10) -> Chain:
    """A filter base chain sending NEW connections through `checks`; by default just before
    DNAT, where it still sees the service address."""
    return Chain(name, tuple(_jump_if_new(c) for c in checks), Hook("filter", hook, priority))


def _nat_chain(name: str, hook: str, priority: int, target: str) -> Chain:
    return Chain(name, (Rule((Verdict("jump", target),)),), Hook("nat", hook, priority))


def _base_chains() -> tuple[Chain, ...]:
    """Filter chains just before DNAT, NAT chains at the usual priorities, and a post-DNAT
    check of the node's own traffic."""
    return (
        _filter_chain(n.FILTER_PREROUTING, "prerouting", n.FIREWALL_CHECK),
        _filter_chain(
            n.FILTER_INPUT, "input", n.NODEPORT_ENDPOINTS_CHECK, n.SERVICE_ENDPOINTS_CHECK
        ),
        _filter_chain(n.FILTER_FORWARD, "forward", n.SERVICE_ENDPOINTS_CHECK, n.CLUSTER_IPS_CHECK),
        _filter_chain(n.FILTER_OUTPUT, "output", n.SERVICE_ENDPOINTS_CHECK, n.FIREWALL_CHECK),
        # The node's own traffic is DNATed in this same hook: only after that does an address
        # still being a ClusterIP mean a port no service has.
        _filter_chain(
            n.FILTER_OUTPUT_POST_DNAT, "output", n.CLUSTER_IPS_CHECK, priority=DSTNAT + 10
        ),
        _nat_chain(n.NAT_PREROUTING, "prerouting", DSTNAT, n.SERVICES),
        _nat_chain(n.NAT_OUTPUT, "output", DSTNAT, n.SERVICES),
        _nat_chain(n.NAT_POSTROUTING, "postrouting", SRCNAT, n.MASQUERADING),
    )


@dataclass(frozen=True, slots=True)
class NodePorts:
    """Where NodePorts answer: every local address but loopback, or these addresses."""

    match_all: bool
    ips: tuple[str, ...] = ()


def plan_node_ports(config: ProxyConfig, node: NodeInfo, family: int) -> NodePorts:
    """nodePortAddresses; unset means the node's primary addresses, as upstream's nftables mode
    (the iptables mode's default is every address). Loopback never takes NodePorts here."""
    if not config.node_port_addresses:
        config = replace(config, node_port_addresses=("primary",))
    cidrs = node_port_cidrs(config, family, node)
    if ZERO_CIDR[family] in cidrs:
        return NodePorts(match_all=True)
    nets = [ipaddress.ip_network(c) for c in cidrs]
    chosen = {str(net.network_address) for net in nets if net.prefixlen == net.max_prefixlen}
    chosen.update(
        ip
        for ip in of_family(node.local_addresses, family)
        if any(ipaddress.ip_address(ip) in net for net in nets)
    )
    usable = (ip for ip in chosen if not ipaddress.ip_address(ip).is_loopback)
    return NodePorts(False, tuple(sorted(usable, key=ipaddress.ip_address)))


def _shared_chains(config: ProxyConfig, family: int, node_ports: NodePorts) -> tuple[Chain, ...]:
    mark = 1 << config.masquerade_bit

    def to_nodeports(map_name: str) -> Rule:
        if node_ports.match_all:
            where = (FibLocal(Key.DADDR), Match(Key.DADDR, nft_cidr(LOOPBACK[family]), negate=True))
            return Rule((*where, Vmap(PROTO_PORT, map_name)))
        return Rule((Lookup((Key.DADDR,), n.NODEPORT_IPS), Vmap(PROTO_PORT, map_name)))

    return (
        Chain(
            n.CLUSTER_IPS_CHECK,
            (
                Rule(
                    (Lookup((Key.DADDR,), n.CLUSTER_IPS), Reject()),
                    "Reject traffic to invalid ports of ClusterIPs",
                ),
            ),
        ),
        Chain(n.FIREWALL_CHECK, (Rule((Vmap(IP_PROTO_PORT, n.FIREWALL_IPS),)),)),
        Chain(n.MARK_FOR_MASQUERADE, (Rule((MarkSet("|", mark),)),)),
        Chain(
            n.MASQUERADING,
            (
                Rule((MarkClear(mark), Verdict("return"))),
                Rule((MarkSet("^", mark),)),
                Rule((Masquerade(),)),
            ),
        ),
        Chain(n.NODEPORT_ENDPOINTS_CHECK, (to_nodeports(n.NO_ENDPOINT_NODEPORTS),)),
        Chain(
            n.REJECT_CHAIN,
            (Rule((Reject(),)),),
            comment="helper for @no-endpoint-services / @no-endpoint-nodeports",
        ),
        Chain(n.SERVICE_ENDPOINTS_CHECK, (Rule((Vmap(IP_PROTO_PORT, n.NO_ENDPOINT_SERVICES),)),)),
        Chain(
            n.SERVICES,
            (Rule((Vmap(IP_PROTO_PORT, n.SERVICE_IPS),)), to_nodeports(n.SERVICE_NODEPORTS)),
        ),
    )


def plan_nft_table(
    services: ServicePortMap,
    endpoints: EndpointsMap,
    node: NodeInfo,
    config: ProxyConfig,
    family: int = 4,
    cache: NftPlanCache | None = None,
) -> TablePlan:
    ctx = NftContext(
        family=family,
        config=config,
        node_name=node.name,
        zone=node.zone,
        detector=build_local_detector(config, node, family),
        node_ip=node_ip(config, node, family),
    )
    node_ports = plan_node_ports(config, node, family)
    frame = TableFrame(
        family=family,
        name=n.TABLE,
        comment=n.TABLE_COMMENT,
        ctx=ctx,
        chains=(*_base_chains(), *_shared_chains(config, family, node_ports)),
        sets=_maps(family),
        elements=tuple((n.NODEPORT_IPS, Element((ip,))) for ip in node_ports.ips),
    )
    return (cache if cache is not None else NftPlanCache()).plan(frame, services, endpoints)
