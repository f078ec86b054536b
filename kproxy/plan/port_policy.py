"""What one service port's rules do for one address family, whatever the mode writes them as:
its addresses of that family, which endpoints internal and external traffic reach, and what
happens when there are none (upstream's CategorizeEndpoints plus the traffic policies)."""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.model.endpoint import Endpoint
from kproxy.model.service import ServicePort
from kproxy.plan.addresses import ZERO_CIDR, of_family
from kproxy.plan.endpoints import EndpointCategories, categorize_endpoints


@dataclass(frozen=True, slots=True)
class PortView:
    """One service port seen from one family."""

    sp: ServicePort
    family: int
    cluster_ip: str
    external_ips: tuple[str, ...]
    lb_ips: tuple[str, ...]
    source_ranges: tuple[str, ...]

    @property
    def externally_accessible(self) -> bool:
        return self.sp.node_port != 0 or bool(self.lb_ips) or bool(self.external_ips)


def view_port(sp: ServicePort, family: int) -> PortView | None:
    """The port's addresses of `family`, or None when it has no ClusterIP of that family."""
    cluster_ips = of_family(sp.cluster_ips, family)
    if not cluster_ips:
        return None
    ranges = of_family(sp.load_balancer_source_ranges, family)
    if ZERO_CIDR[family] in ranges:
        ranges = ()  # an all-addresses range means no filtering
    return PortView(
        sp=sp,
        family=family,
        cluster_ip=cluster_ips[0],
        external_ips=of_family(sp.external_ips, family),
        lb_ips=of_family(sp.load_balancer_ips, family),
        source_ranges=ranges,
    )


@dataclass(frozen=True, slots=True)
class PortPolicy:
    cats: EndpointCategories
    uses_cluster: bool  # a cluster-wide endpoint chain is needed
    uses_local: bool  # a node-local endpoint chain is needed
    has_internal: bool  # ClusterIP traffic has somewhere to go
    has_external: bool  # external traffic has somewhere to go
    uses_firewall: bool  # loadBalancerSourceRanges filter the LB IPs
    internal: tuple[Endpoint, ...]  # where ClusterIP traffic goes (internalTrafficPolicy)
    # Where NodePort, externalIP and LB traffic goes (externalTrafficPolicy); none when the
    # port has no such address of this family.
    external: tuple[Endpoint, ...]

    @property
    def no_local_internal(self) -> bool:
        return self.cats.has_any and not self.has_internal

    @property
    def no_local_external(self) -> bool:
        return self.cats.has_any and not self.has_external


def decide_port_policy(
    port: PortView, endpoints: tuple[Endpoint, ...], node_name: str, zone: str
) -> PortPolicy:
    sp = port.sp
    itp_local, etp_local = sp.internal_policy_local, sp.external_policy_local
    uses_cluster = not itp_local or port.externally_accessible
    uses_local = itp_local or (etp_local and port.externally_accessible)
    cats = categorize_endpoints(
        [ep for ep in endpoints if ep.family == port.family],
        node_name,
        zone,
        uses_cluster=uses_cluster,
        uses_local=uses_local,
    )
    return PortPolicy(
        cats=cats,
        uses_cluster=uses_cluster,
        uses_local=uses_local,
        has_internal=cats.has_any and (not itp_local or bool(cats.local)),
        has_external=cats.has_any and (not etp_local or bool(cats.local)),
        uses_firewall=cats.has_any and bool(port.lb_ips) and bool(port.source_ranges),
        internal=cats.local if itp_local else cats.cluster,
        external=(cats.local if etp_local else cats.cluster) if port.externally_accessible else (),
    )
