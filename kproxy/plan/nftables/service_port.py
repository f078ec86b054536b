"""One service port's part of the nftables table, for one family: the map elements that lead its
addresses into its chains (or to a drop/reject), and its own chains and affinity sets.

Endpoint choice is a cascade of `numgen random mod (N-i) 0 goto endpoint-i` rules rather than
upstream's anonymous `numgen ... vmap {}` per service: the same probabilities, but the kernel
binds no anonymous set per service, which makes a cold start of 10,000 services load in seconds
instead of minutes (see the note on the nftables mode).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.service import ServicePort
from kproxy.plan.local_traffic import LocalDetector
from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.ir import (
    Chain,
    DerivedRules,
    Dnat,
    Element,
    FibLocal,
    Key,
    Lookup,
    Match,
    NamedSet,
    NumgenZero,
    PortMatch,
    Rule,
    Statement,
    Update,
    Verdict,
)
from kproxy.plan.port_policy import PortPolicy, PortView, decide_port_policy, view_port

AFFINITY_SET_SIZE = 65535  # what nft gives a dynamic set without a size
ADDRESS_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}

MARK_MASQ = Verdict("jump", n.MARK_FOR_MASQUERADE)
DROP = Verdict("drop")
TO_REJECT = Verdict("goto", n.REJECT_CHAIN)


@dataclass(frozen=True, slots=True)
class NftContext:
    """What every service port's part depends on besides the port itself."""

    family: int
    config: ProxyConfig
    node_name: str
    zone: str
    detector: LocalDetector
    node_ip: str | None  # this family's primary node IP, for loadBalancerSourceRanges


@dataclass(frozen=True, slots=True)
class PortPart:
    chains: tuple[Chain, ...] = ()
    sets: tuple[NamedSet, ...] = ()
    elements: tuple[tuple[str, Element], ...] = ()  # (map or set name, element)
    no_local_internal: int = 0
    no_local_external: int = 0
    rules: int = 0


def _goto(chain: str) -> Verdict:
    return Verdict("goto", chain)


def _ip_key(port: PortView, ip: str) -> tuple[str, ...]:
    return (ip, port.sp.name.protocol.lower, str(port.sp.port))


def plan_port_part(ctx: NftContext, sp: ServicePort, endpoints: tuple[Endpoint, ...]) -> PortPart:
    port = view_port(sp, ctx.family)
    if port is None:
        return PortPart()
    policy = decide_port_policy(port, endpoints, ctx.node_name, ctx.zone)
    cats, spn = policy.cats, sp.name
    cluster_chain = n.service_chain(spn)  # one string, shared by the chain and the jumps
    internal = n.local_chain(spn) if sp.internal_policy_local else cluster_chain
    # Each endpoint's name part, hashed once (by identity: the categories share the objects).
    reachable = cats.reachable
    bases = n.endpoint_bases(spn, reachable)
    # Each endpoint chain's (and affinity set's) name, made once: shared by every rule naming it.
    names = {key: n.ENDPOINT_PREFIX + base for key, base in bases.items()}
    affinity = (
        {key: n.AFFINITY_PREFIX + base for key, base in bases.items()}
        if sp.session_affinity_seconds is not None
        else None
    )
    chains: list[Chain] = []
    if cats.has_any and port.externally_accessible:
        chains.append(_external_chain(ctx, port, policy.has_external))
    if policy.uses_firewall:
        chains.append(_firewall_chain(ctx, port))
    masq = _clusterip_masquerade(ctx, port) if policy.has_internal else None
    for name, eps, wanted in (
        (cluster_chain, cats.cluster, policy.uses_cluster),
        (n.local_chain(spn), cats.local, policy.uses_local),
    ):
        if eps and wanted:
            head = (masq,) if masq is not None and name == internal else ()
            chains.append(Chain(name, _balance(head, eps, names, affinity)))
    chains.extend(_endpoint_chains(port, reachable, names, affinity))
    return PortPart(
        rules=sum(len(c.rules) for c in chains),
        chains=tuple(chains),
        sets=_affinity_sets(port, reachable, affinity),
        elements=_first_of_each_key(_elements(port, policy, internal)),
        no_local_internal=int(policy.no_local_internal),
        no_local_external=int(policy.no_local_external),
    )


def _elements(port: PortView, policy: PortPolicy, internal: str) -> list[tuple[str, Element]]:
    """The map elements that lead the port's addresses into its chains, or to a drop/reject."""
    sp, spn, has_any = port.sp, port.sp.name, policy.cats.has_any
    external = n.external_chain(spn)
    no_endpoints = TO_REJECT if not has_any else DROP
    elements: list[tuple[str, Element]] = [(n.CLUSTER_IPS, Element((port.cluster_ip,)))]
    if policy.has_internal:
        elements.append((n.SERVICE_IPS, Element(_ip_key(port, port.cluster_ip), _goto(internal))))
    else:
        elements.append(
            (n.NO_ENDPOINT_SERVICES, Element(_ip_key(port, port.cluster_ip), no_endpoints))
        )
    for ip in (*port.external_ips, *port.lb_ips):
        if has_any:
            elements.append((n.SERVICE_IPS, Element(_ip_key(port, ip), _goto(external))))
        if not policy.has_external:
            elements.append((n.NO_ENDPOINT_SERVICES, Element(_ip_key(port, ip), no_endpoints)))
    if policy.uses_firewall:
        firewall = _goto(n.firewall_chain(spn))
        elements.extend(
            (n.FIREWALL_IPS, Element(_ip_key(port, ip), firewall)) for ip in port.lb_ips
        )
    if sp.node_port:
        key = (spn.protocol.lower, str(sp.node_port))
        if has_any:
            elements.append((n.SERVICE_NODEPORTS, Element(key, _goto(external))))
        if not policy.has_external:
            elements.append((n.NO_ENDPOINT_NODEPORTS, Element(key, no_endpoints)))
    return elements


def _first_of_each_key(elements: list[tuple[str, Element]]) -> tuple[tuple[str, Element], ...]:
    """One element per set and key: the first wins (an external IP that is also the ClusterIP)."""
    first: dict[tuple[str, tuple[str, ...]], tuple[str, Element]] = {}
    for item in elements:
        first.setdefault((item[0], item[1].key), item)
    return tuple(first.values()) if len(first) < len(elements) else tuple(elements)


def _if_local(detector: LocalDetector, negate: bool) -> Match | None:
    """The local-traffic detector as a match: pod traffic, or (negate) everything else."""
    if detector.source_cidr is not None:
        return Match(Key.SADDR, detector.source_cidr, negate)
    if detector.in_iface is not None:
        return Match(Key.IIFNAME, detector.in_iface, negate)
    return None


def _clusterip_masquerade(ctx: NftContext, port: PortView) -> Rule | None:
    """Masquerade ClusterIP traffic that does not come from pods (or all of it, masqueradeAll)."""
    to_vip: tuple[Statement, ...] = (
        Match(Key.DADDR, port.cluster_ip),
        PortMatch(port.sp.name.protocol.lower, port.sp.port),
    )
    if ctx.config.masquerade_all:
        return Rule((*to_vip, MARK_MASQ))
    not_local = _if_local(ctx.detector, negate=True)
    return Rule((*to_vip, not_local, MARK_MASQ)) if not_local is not None else None


def _external_chain(ctx: NftContext, port: PortView, has_external: bool) -> Chain:
    """Masquerade external traffic (Cluster policy), or short-circuit pod and host traffic to the
    cluster-wide chain and keep the client's address for the rest (Local policy)."""
    spn = port.sp.name
    to_service = _goto(n.service_chain(spn))
    rules: list[Rule] = []
    if not port.sp.external_policy_local:
        rules.append(Rule((MARK_MASQ,), "masquerade traffic for external destinations"))
    else:
        pods = _if_local(ctx.detector, negate=False)
        if pods is not None:
            rules.append(Rule((pods, to_service), "short-circuit pod traffic"))
        local = FibLocal(Key.SADDR)
        rules.append(Rule((local, MARK_MASQ), "masquerade local traffic"))
        rules.append(Rule((local, to_service), "short-circuit local traffic"))
    if has_external:
        local_policy = port.sp.external_policy_local
        rules.append(Rule((_goto(n.local_chain(spn) if local_policy else n.service_chain(spn)),)))
    return Chain(n.external_chain(spn), tuple(rules))


def _firewall_chain(ctx: NftContext, port: PortView) -> Chain:
    """Reached before DNAT for a LoadBalancer IP: allowed sources return, the rest is dropped."""
    allowed = list(port.source_ranges)
    node_ip = ctx.node_ip
    if node_ip is not None and any(
        ipaddress.ip_address(node_ip) in ipaddress.ip_network(r) for r in port.source_ranges
    ):
        # A VIP bound on the node makes node-originated traffic carry the VIP as its source.
        allowed.extend(port.lb_ips)
    rules = [Rule((Match(Key.SADDR, nft_cidr(r)), Verdict("return"))) for r in allowed]
    rules.append(Rule((DROP,), "other traffic is dropped"))
    return Chain(n.firewall_chain(port.sp.name), tuple(rules))


def nft_cidr(text: str) -> str:
    """A host CIDR as a bare address, as nft lists it."""
    net = ipaddress.ip_network(text, strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


class CascadeRules(DerivedRules):
    """A service chain's rules: `head` (the ClusterIP masquerade), with affinity a lookup of
    each endpoint's set, then the probability cascade over the endpoint chains, the last one
    unconditional. Kept as the chains' names (and sets'), made into rules when read."""

    __slots__ = ("affinity_sets", "chain_names", "head")

    def __init__(
        self, head: tuple[Rule, ...], chain_names: tuple[str, ...], affinity_sets: tuple[str, ...]
    ) -> None:
        self.head, self.chain_names, self.affinity_sets = head, chain_names, affinity_sets

    def values(self) -> tuple[object, ...]:
        return (self.head, self.chain_names, self.affinity_sets)

    def __len__(self) -> int:
        return len(self.head) + len(self.chain_names) + len(self.affinity_sets)

    def build(self) -> tuple[Rule, ...]:
        gotos = [_goto(name) for name in self.chain_names]
        rules = list(self.head)
        if self.affinity_sets:
            rules.extend(
                Rule((Lookup((Key.SADDR,), set_name), goto))
                for set_name, goto in zip(self.affinity_sets, gotos, strict=True)
            )
        count = len(gotos)
        for i, goto in enumerate(gotos):
            rules.append(Rule((_numgen(count - i), goto) if i < count - 1 else (goto,)))
        return tuple(rules)


def _balance(
    head: tuple[Rule, ...],
    endpoints: tuple[Endpoint, ...],
    chain_names: dict[int, str],
    affinity: dict[int, str] | None,
) -> CascadeRules:
    """Affinity lookups, then the probability cascade, the last endpoint unconditional."""
    names = tuple([chain_names[id(ep)] for ep in endpoints])
    sets = tuple([affinity[id(ep)] for ep in endpoints]) if affinity is not None else ()
    return CascadeRules(head, names, sets)


@lru_cache(maxsize=256)
def _numgen(modulus: int) -> NumgenZero:
    """Shared: every service's cascade holds the same few."""
    return NumgenZero(modulus)


@lru_cache(maxsize=8)
def _proto_match(proto: str) -> Match:
    return Match(Key.L4PROTO, proto)


class EndpointRules(DerivedRules):
    """An endpoint chain's rules: masquerade hairpin traffic, remember the client for
    affinity, DNAT. Kept as the endpoint's address, port and protocol (and affinity set)."""

    __slots__ = ("affinity_set", "ip", "port", "proto")

    def __init__(self, ip: str, port: int, proto: str, affinity_set: str | None) -> None:
        self.ip, self.port, self.proto, self.affinity_set = ip, port, proto, affinity_set

    def values(self) -> tuple[object, ...]:
        return (self.ip, self.port, self.proto, self.affinity_set)

    def __len__(self) -> int:
        return 2 if self.affinity_set is None else 3

    def build(self) -> tuple[Rule, ...]:
        hairpin = Rule((Match(Key.SADDR, self.ip), MARK_MASQ))
        dnat = Rule((_proto_match(self.proto), Dnat(self.ip, self.port)))
        if self.affinity_set is None:
            return (hairpin, dnat)
        return (hairpin, Rule((Update(self.affinity_set, Key.SADDR),)), dnat)


def _endpoint_chains(
    port: PortView,
    endpoints: tuple[Endpoint, ...],
    names: dict[int, str],
    affinity: dict[int, str] | None,
) -> list[Chain]:
    """Each endpoint's chain. (A loop over the port's endpoints: this runs once per endpoint
    of the cluster.)"""
    proto = port.sp.name.protocol.lower
    if affinity is None:
        return [
            Chain(names[id(ep)], EndpointRules(ep.ip, ep.port, proto, None)) for ep in endpoints
        ]
    return [
        Chain(names[id(ep)], EndpointRules(ep.ip, ep.port, proto, affinity[id(ep)]))
        for ep in endpoints
    ]


def _affinity_sets(
    port: PortView, endpoints: tuple[Endpoint, ...], affinity: dict[int, str] | None
) -> tuple[NamedSet, ...]:
    seconds = port.sp.session_affinity_seconds
    if seconds is None or affinity is None:
        return ()
    return tuple(
        NamedSet(
            affinity[id(ep)],
            (ADDRESS_TYPE[port.family],),
            flags=("dynamic", "timeout"),
            timeout=seconds,
            size=AFFINITY_SET_SIZE,
        )
        for ep in endpoints
    )
