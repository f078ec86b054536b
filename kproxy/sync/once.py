"""One sync: plan, apply, report. `kproxy sync --once` runs it once; the agent's loop repeats it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kproxy.dataplane.base import ApplyResult, Dataplane
from kproxy.errors import InvalidObjectError
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.plan.iptables.ruleset import build_node_ruleset
from kproxy.rules.ir import Ruleset
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import combine, replace_all
from kproxy.sync.gcpause import gc_paused
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


def plan_state(state: ClusterState, node: NodeInfo, config: ProxyConfig, family: int) -> Ruleset:
    return build_node_ruleset(state.services_map(), state.endpoints_map(), node, config, family)


def sync_once(
    state: ClusterState,
    node: NodeInfo,
    config: ProxyConfig,
    dataplanes: Mapping[int, Dataplane],
) -> SyncReport:
    """Plan and apply every family; IPv4 and IPv6 are separate rulesets and commits."""
    started = time.monotonic()
    services = state.services_map()
    endpoints = state.endpoints_map()
    result = ApplyResult()
    with gc_paused():
        for family, dataplane in sorted(dataplanes.items()):
            ruleset = build_node_ruleset(services, endpoints, node, config, family)
            result.tables.extend(dataplane.apply(ruleset).tables)
    return SyncReport(
        services=len({spn.service for spn in services}),
        service_ports=len(services),
        endpoints=sum(len(endpoints.get(spn, ())) for spn in services),
        addresses=len({ep.ip for spn in services for ep in endpoints.get(spn, ())}),
        result=result,
        seconds=time.monotonic() - started,
    )
