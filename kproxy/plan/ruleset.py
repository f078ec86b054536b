"""build_ruleset: the whole desired ruleset of one address family, as a pure function of the
services, their endpoints, the node and the config. Rule order and content follow upstream
kube-proxy's iptables mode (see shared/reference/kube-proxy-iptables.md)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import ServicePort, ServicePortName
from kproxy.plan import naming
from kproxy.plan.endpoints import categorize_endpoints
from kproxy.rules import fragments as f
from kproxy.rules.ir import Chain, JumpRule, Match, Rule, Ruleset, Table

# Upstream drops per-endpoint comments once the sum of endpoints exceeds this.
LARGE_CLUSTER_ENDPOINTS = 1000

NODEPORTS_TAIL_COMMENT = (
    "kubernetes service nodeports; NOTE: this must be the last rule in this chain"
)


def _jump(chain: str, target: str, text: str, *extra: Match) -> JumpRule:
    return JumpRule(chain, Rule(matches=(*extra, f.comment(text)), target=f.jump(target)))


def _jump_rules() -> tuple[tuple[JumpRule, ...], tuple[JumpRule, ...]]:
    """(filter, nat) jumps from built-in chains, in upstream's order; each is inserted at the top
    of its chain, so within a chain the last listed ends up first."""
    new = f.ctstate("NEW")
    portals = "kubernetes service portals"
    external = "kubernetes externally-visible service portals"
    firewall = "kubernetes load balancer firewall"
    filter_jumps = (
        _jump("INPUT", "KUBE-EXTERNAL-SERVICES", external, new),
        _jump("FORWARD", "KUBE-EXTERNAL-SERVICES", external, new),
        _jump("INPUT", "KUBE-NODEPORTS", "kubernetes health check service ports"),
        _jump("FORWARD", "KUBE-SERVICES", portals, new),
        _jump("OUTPUT", "KUBE-SERVICES", portals, new),
        _jump("FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
        _jump("INPUT", "KUBE-PROXY-FIREWALL", firewall, new),
        _jump("OUTPUT", "KUBE-PROXY-FIREWALL", firewall, new),
        _jump("FORWARD", "KUBE-PROXY-FIREWALL", firewall, new),
    )
    nat_jumps = (
        _jump("OUTPUT", "KUBE-SERVICES", portals),
        _jump("PREROUTING", "KUBE-SERVICES", portals),
        _jump("POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    )
    return filter_jumps, nat_jumps


@dataclass
class _Builder:
    """Accumulates chains while service ports are planned one by one."""

    family: int
    config: ProxyConfig
    node_name: str
    large_cluster: bool
    nat_services: list[Rule] = field(default_factory=list)
    filter_services: list[Rule] = field(default_factory=list)
    service_chains: list[Chain] = field(default_factory=list)

    def local_cidrs(self) -> list[str]:
        return [
            c for c in self.config.cluster_cidrs if ipaddress.ip_network(c).version == self.family
        ]

    def add_service_port(self, sp: ServicePort, endpoints: tuple[Endpoint, ...]) -> None:
        cluster_ip = next(
            (ip for ip in sp.cluster_ips if ipaddress.ip_address(ip).version == self.family), None
        )
        if cluster_ip is None:
            return
        eps = tuple(ep for ep in endpoints if ep.family == self.family)
        cats = categorize_endpoints(eps, self.node_name)
        spn = sp.name
        proto = spn.protocol.lower
        dst = f.cidr(cluster_ip)
        vip_match = f.protocol_match(proto, sp.port)
        if not cats.has_any:
            self.filter_services.append(
                Rule(
                    dst=dst,
                    protocol=proto,
                    matches=(f.comment(f"{spn} has no endpoints"), vip_match),
                    target=f.reject(self.family),
                )
            )
            return
        svc_chain = naming.service_chain(spn)
        cluster_ip_comment = f.comment(f"{spn} cluster IP")
        self.nat_services.append(
            Rule(
                dst=dst,
                protocol=proto,
                matches=(cluster_ip_comment, vip_match),
                target=f.jump(svc_chain),
            )
        )
        svc_rules: list[Rule] = []
        masq_source = self._clusterip_masquerade_source()
        if masq_source is not None:
            src, invert = masq_source
            svc_rules.append(
                Rule(
                    src=src,
                    src_invert=invert,
                    dst=dst,
                    protocol=proto,
                    matches=(cluster_ip_comment, vip_match),
                    target=f.jump("KUBE-MARK-MASQ"),
                )
            )
        svc_rules.extend(self._balance(spn, cats.cluster, sp.session_affinity_seconds))
        self.service_chains.append(Chain(svc_chain, tuple(svc_rules)))
        for ep in cats.reachable:
            self.service_chains.append(self._endpoint_chain(sp, ep))

    def _clusterip_masquerade_source(self) -> tuple[str | None, bool] | None:
        """(source, inverted) for the ClusterIP masquerade rule, or None for no such rule."""
        if self.config.masquerade_all:
            return None, False
        cidrs = self.local_cidrs()
        if cidrs:
            return cidrs[0], True
        return None

    def _endpoint_comment(self, text: str) -> tuple[Match, ...]:
        return () if self.large_cluster else (f.comment(text),)

    def _balance(
        self, spn: ServicePortName, endpoints: tuple[Endpoint, ...], affinity: int | None
    ) -> list[Rule]:
        """Affinity checks, then one probability rule per endpoint, the last unconditional."""
        rules = []
        chains = [naming.endpoint_chain(spn, ep) for ep in endpoints]
        if affinity is not None:
            for ep, sep in zip(endpoints, chains, strict=True):
                rules.append(
                    Rule(
                        matches=(
                            *self._endpoint_comment(f"{spn} -> {ep}"),
                            f.recent_check(sep, affinity, self.family),
                        ),
                        target=f.jump(sep),
                    )
                )
        n = len(endpoints)
        for i, (ep, sep) in enumerate(zip(endpoints, chains, strict=True)):
            stat = (f.statistic(n - i),) if i < n - 1 else ()
            rules.append(
                Rule(matches=(*self._endpoint_comment(f"{spn} -> {ep}"), *stat), target=f.jump(sep))
            )
        return rules

    def _endpoint_chain(self, sp: ServicePort, ep: Endpoint) -> Chain:
        spn = sp.name
        sep = naming.endpoint_chain(spn, ep)
        proto = spn.protocol.lower
        text = self._endpoint_comment(str(spn))
        affinity = (
            (f.recent_set(sep, self.family),) if sp.session_affinity_seconds is not None else ()
        )
        return Chain(
            sep,
            (
                Rule(src=f.cidr(ep.ip), matches=text, target=f.jump("KUBE-MARK-MASQ")),
                Rule(
                    protocol=proto,
                    matches=(*text, *affinity, f.protocol_match(proto)),
                    target=f.dnat(str(ep)),
                ),
            ),
        )


def _static_nat_chains(config: ProxyConfig) -> list[Chain]:
    value = config.masquerade_value
    return [
        Chain("KUBE-MARK-MASQ", (Rule(target=f.set_mark(value, value)),)),
        Chain(
            "KUBE-POSTROUTING",
            (
                Rule(matches=(f.mark(config.masquerade_mark, invert=True),), target=f.RETURN),
                Rule(target=f.set_mark(value, "0x0")),
                Rule(
                    matches=(f.comment("kubernetes service traffic requiring SNAT"),),
                    target=f.masquerade(),
                ),
            ),
        ),
        Chain("KUBE-NODEPORTS"),
    ]


def _forward_chain(config: ProxyConfig) -> Chain:
    return Chain(
        "KUBE-FORWARD",
        (
            Rule(matches=(f.ctstate("INVALID"),), target=f.DROP),
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


def build_ruleset(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    node: NodeInfo,
    config: ProxyConfig,
    family: int = 4,
) -> Ruleset:
    """The complete kproxy-owned ruleset for one family. Pure: same input, same output."""
    total_endpoints = sum(len(endpoints.get(spn, ())) for spn in services)
    builder = _Builder(
        family=family,
        config=config,
        node_name=node.name,
        large_cluster=total_endpoints > LARGE_CLUSTER_ENDPOINTS,
    )
    for spn in sorted(services):
        builder.add_service_port(services[spn], endpoints.get(spn, ()))
    nodeports_tail = Rule(
        matches=(f.comment(NODEPORTS_TAIL_COMMENT), f.addrtype(dst_type="LOCAL")),
        target=f.jump("KUBE-NODEPORTS"),
    )
    filter_jumps, nat_jumps = _jump_rules()
    nat = Table(
        "nat",
        chains=(
            Chain("KUBE-SERVICES", (*builder.nat_services, nodeports_tail)),
            *_static_nat_chains(config),
            *builder.service_chains,
        ),
        jumps=nat_jumps,
    )
    filter_table = Table(
        "filter",
        chains=(
            Chain("KUBE-SERVICES", tuple(builder.filter_services)),
            Chain("KUBE-EXTERNAL-SERVICES"),
            _forward_chain(config),
            Chain("KUBE-NODEPORTS"),
            Chain("KUBE-PROXY-FIREWALL"),
        ),
        jumps=filter_jumps,
    )
    return Ruleset(family=family, tables=(filter_table, nat))
