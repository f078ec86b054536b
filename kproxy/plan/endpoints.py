"""Which endpoints a service port's chains send traffic to (upstream's CategorizeEndpoints).

Cluster-policy traffic goes to ready endpoints (narrowed by topology hints when every ready
endpoint carries them), else to serving+terminating ones. Local-policy traffic goes to this node's
ready endpoints, else to its serving+terminating ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kproxy.model.endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class EndpointCategories:
    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    has_any: bool = False

    @property
    def reachable(self) -> tuple[Endpoint, ...]:
        """Every endpoint some chain points at: these get KUBE-SEP chains, in `ip:port` order."""
        return tuple(sorted(dict.fromkeys(self.cluster + self.local), key=str))


def _select(
    endpoints: Sequence[Endpoint], keep: Callable[[Endpoint], bool]
) -> tuple[Endpoint, ...]:
    return tuple(ep for ep in endpoints if keep(ep))


def _serving_terminating(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


def topology_filter(
    endpoints: Sequence[Endpoint], node_name: str, zone: str
) -> Callable[[Endpoint], bool]:
    """The hint filter cluster traffic uses: same-node hints when every ready endpoint has them
    and one names this node; else zone hints likewise; else no filtering."""
    ready = [ep for ep in endpoints if ep.ready]
    node_hinted = ready and all(ep.node_hints for ep in ready)
    if node_hinted and any(node_name in ep.node_hints for ep in ready):
        return lambda ep: node_name in ep.node_hints
    zone_hinted = ready and zone and all(ep.zone_hints for ep in ready)
    if zone_hinted and any(zone in ep.zone_hints for ep in ready):
        return lambda ep: zone in ep.zone_hints
    return lambda ep: True


def categorize_endpoints(
    endpoints: Sequence[Endpoint],
    node_name: str,
    zone: str = "",
    uses_cluster: bool = True,
    uses_local: bool = False,
) -> EndpointCategories:
    cluster: tuple[Endpoint, ...] = ()
    if uses_cluster:
        in_topology = topology_filter(endpoints, node_name, zone)
        cluster = _select(endpoints, lambda ep: ep.ready and in_topology(ep))
        if not cluster:
            cluster = _select(endpoints, _serving_terminating)
    has_any = bool(cluster) or any(ep.ready or _serving_terminating(ep) for ep in endpoints)
    local: tuple[Endpoint, ...] = ()
    if uses_local:
        here = [ep for ep in endpoints if node_name and ep.node_name == node_name]
        local = _select(here, lambda ep: ep.ready) or _select(here, _serving_terminating)
    return EndpointCategories(cluster=cluster, local=local, has_any=has_any)
