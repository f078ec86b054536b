"""`kproxy sync --once`: one call of the agent's own sync (SyncLoop), over manifests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kproxy.dataplane.base import ApplyResult, ModeDataplane
from kproxy.dataplane.xtables.lock import LOCK_TIMEOUT
from kproxy.errors import InvalidObjectError, ManifestError
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.addresses import build_allow_list
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import combine, replace_all
from kproxy.sync.loop import StateBox, SyncLoop
from kproxy.sync.modes import ProxyMode, other_modes_leftovers
from kproxy.watch.manifests import Manifests


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


@dataclass(frozen=True)
class SyncReport:
    services: int
    service_ports: int
    endpoints: int  # ready endpoints, per service port
    addresses: int  # distinct IPs of the ready endpoints
    result: ApplyResult
    seconds: float
    not_ready: int = 0  # endpoints listed but not ready (serving-terminating, or neither)

    def summary(self, seconds: float | None = None) -> str:
        """One line. The time is the sync's own, as its `sync_completed` log says; `seconds`,
        when given, is the whole command's (with process start-up), shown beside it."""
        not_ready = f", {self.not_ready} not ready" if self.not_ready else ""
        head = (
            f"synced {_count(self.services, 'service')} "
            f"({_count(self.service_ports, 'port')}), "
            f"{_count(self.endpoints, 'ready endpoint')} "
            f"({_count(self.addresses, 'address', 'addresses')}){not_ready}: "
        )
        r = self.result
        if not r.changed:
            body = f"no changes, {_count(r.chains_unchanged, 'chain')} already up to date"
        else:
            left = r.leftover_chains_removed
            others = f" ({left} of another mode)" if left else ""
            body = (
                f"wrote {_count(r.chains_written, 'chain')} ({_count(r.rules_written, 'rule')}), "
                f"removed {_count(r.chains_removed, 'chain')}{others}, "
                f"{r.chains_unchanged} unchanged"
            )
        total = "" if seconds is None else f" ({seconds:.2f}s with start-up)"
        return f"{head}{body}, in {self.seconds:.2f}s{total}"


def state_from_manifests(
    manifests: Manifests,
    on_invalid: Callable[[InvalidObjectError], None],
    config: ProxyConfig | None = None,
) -> ClusterState:
    """A ClusterState holding every valid Service and EndpointSlice; invalid ones are reported
    through `on_invalid` and left out. `config` gives the allow-list of external addresses.

    It consumes `manifests`' Services and EndpointSlices (their lists are left empty): their
    documents weigh more than the state built from them (86 MB of a sync's 659 MB peak at
    10,000 services, bench/memory_profile.py) and nothing reads them after."""
    state = ClusterState()
    if config is not None:
        state.allowed_vips = build_allow_list(config.allowed_external_ip_cidrs)
    load = combine(
        replace_all(Kind.SERVICE, manifests.services),
        replace_all(Kind.ENDPOINT_SLICE, manifests.endpoint_slices),
    )
    errors = load(state)
    del load  # holds the documents too
    manifests.services.clear()
    manifests.endpoint_slices.clear()
    for exc in errors:
        on_invalid(exc)
    return state


def refuse_empty_input(state: ClusterState, path: str) -> None:
    """An empty input (a file truncated by a failed `kubectl get`, a wrong directory) would make
    the sync remove every service rule on the node: refuse unless asked (`--allow-empty`)."""
    if not state.service_keys():
        raise ManifestError(
            f"{path} holds no Service kproxy can program: a sync would remove every service "
            "rule on this node; give --allow-empty to do that (or run `kproxy cleanup`)"
        )


def once_loop(
    state: ClusterState,
    node: NodeInfo,
    config: ProxyConfig,
    mode: ProxyMode,
    dataplane: ModeDataplane,
    lock_timeout: float = LOCK_TIMEOUT,
) -> SyncLoop:
    """The agent's own SyncLoop over `state`, for one sync (and the mode's stop after it): it
    removes the other modes' leftovers after its commit, as the agent's first sync does."""
    health, metrics = ProxyHealth(timeout=2 * config.sync_period), ProxyMetrics()
    box = StateBox(node.name, health, metrics)
    state.node = node
    box.state = state
    leftovers = other_modes_leftovers(mode, lock_timeout)
    return SyncLoop(box, config, mode, dataplane, metrics, health, leftovers=leftovers)


def sync_once(loop: SyncLoop) -> SyncReport:
    """The agent's sync, once: the same SyncLoop steps, a full sync (nothing is trusted before
    the first one). Raises what the sync raised."""
    outcome = loop.sync_or_raise()
    services = outcome.snapshot.services
    ready, addresses, not_ready = outcome.snapshot.endpoint_counts()
    return SyncReport(
        services=len({spn.service for spn in services}),
        service_ports=len(services),
        endpoints=ready,
        addresses=addresses,
        result=outcome.result,
        seconds=outcome.seconds,
        not_ready=not_ready,
    )
