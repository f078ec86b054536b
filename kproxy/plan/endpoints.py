"""Which endpoints a service port's chains send traffic to (upstream's CategorizeEndpoints)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kproxy.model.endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class EndpointCategories:
    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    has_any: bool

    @property
    def reachable(self) -> tuple[Endpoint, ...]:
        """Every endpoint some chain points at: these get KUBE-SEP chains, in `ip:port` order."""
        return tuple(sorted(dict.fromkeys(self.cluster + self.local), key=str))


def _usable(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """Ready endpoints; when none is ready, those still serving while terminating."""
    ready = tuple(ep for ep in endpoints if ep.ready)
    if ready:
        return ready
    return tuple(ep for ep in endpoints if ep.serving and ep.terminating)


def categorize_endpoints(endpoints: Sequence[Endpoint], node_name: str) -> EndpointCategories:
    cluster = _usable(endpoints)
    local = _usable([ep for ep in endpoints if node_name and ep.node_name == node_name])
    return EndpointCategories(cluster=cluster, local=local, has_any=bool(cluster))
