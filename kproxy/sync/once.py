"""`kproxy sync --once`: one call of the agent's own sync (SyncLoop), over manifests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kproxy.dataplane.base import ApplyResult, ModeDataplane
from kproxy.errors import InvalidObjectError
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import combine, replace_all
from kproxy.sync.loop import StateBox, SyncLoop
from kproxy.sync.modes import ProxyMode
from kproxy.watch.manifests import Manifests


@dataclass(frozen=True)
class SyncReport:
    services: int
    service_ports: int
    endpoints: int
    addresses: int
    result: ApplyResult
    seconds: float

    def summary(self, seconds: float | None = None) -> str:
        """One line; `seconds` overrides the sync's own time (e.g. with process start-up)."""
        head = (
            f"synced {self.services} services ({self.service_ports} ports), "
            f"{self.endpoints} endpoints ({self.addresses} addresses): "
        )
        r = self.result
        if not r.changed:
            body = f"no changes, {r.chains_unchanged} chains already up to date"
        else:
            body = (
                f"wrote {r.chains_written} chains ({r.rules_written} rules), "
                f"removed {r.chains_removed} chains, {r.chains_unchanged} unchanged"
            )
        return f"{head}{body}, in {self.seconds if seconds is None else seconds:.2f}s"


def state_from_manifests(
    manifests: Manifests, on_invalid: Callable[[InvalidObjectError], None]
) -> ClusterState:
    """A ClusterState holding every valid Service and EndpointSlice; invalid ones are reported
    through `on_invalid` and left out."""
    state = ClusterState()
    load = combine(
        replace_all(Kind.SERVICE, manifests.services),
        replace_all(Kind.ENDPOINT_SLICE, manifests.endpoint_slices),
    )
    for exc in load(state):
        on_invalid(exc)
    return state


def sync_once(
    state: ClusterState,
    node: NodeInfo,
    config: ProxyConfig,
    mode: ProxyMode,
    dataplane: ModeDataplane,
) -> SyncReport:
    """The agent's sync, once, over `state`: the same SyncLoop steps, a full sync (nothing is
    trusted before the first one). Raises what the sync raised."""
    health, metrics = ProxyHealth(timeout=2 * config.sync_period), ProxyMetrics()
    box = StateBox(node.name, health, metrics)
    state.node = node
    box.state = state
    loop = SyncLoop(box, config, mode.planner(config), dataplane, metrics, health)
    outcome = loop.sync_or_raise()
    services, endpoints = outcome.snapshot.services, outcome.snapshot.endpoints
    return SyncReport(
        services=len({spn.service for spn in services}),
        service_ports=len(services),
        endpoints=sum(len(endpoints.get(spn, ())) for spn in services),
        addresses=len({ep.ip for spn in services for ep in endpoints.get(spn, ())}),
        result=outcome.result,
        seconds=outcome.seconds,
    )
