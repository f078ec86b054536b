"""`kproxy sync --once`: one call of the agent's own sync (SyncLoop), over manifests."""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.dataplane.base import ApplyResult, ModeDataplane
from kproxy.dataplane.xtables.lock import LOCK_TIMEOUT
from kproxy.errors import ManifestError
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.state.cluster import ClusterState
from kproxy.sync.loop import StateBox, SyncLoop, endpoint_counts
from kproxy.sync.modes import ProxyMode, other_modes_leftovers


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
    removes the other modes' leftovers after its commit, as the agent's first sync does. The
    loop owns `state`: unless the mode serves in this process after the sync (and its stop
    syncs again), it lets go of it once the plan is made, so the caller should hold no other
    reference to it (sync_once reports its counts all the same)."""
    health, metrics = ProxyHealth(timeout=2 * config.sync_period), ProxyMetrics()
    box = StateBox(node.name, health, metrics)
    state.node = node
    box.state = state
    leftovers = other_modes_leftovers(mode, lock_timeout)
    lets_go = not mode.serves_in_process
    return SyncLoop(
        box,
        config,
        mode,
        dataplane,
        metrics,
        health,
        leftovers=leftovers,
        lets_go_after_plan=lets_go,
    )


def sync_once(loop: SyncLoop) -> SyncReport:
    """The agent's sync, once: the same SyncLoop steps, a full sync (nothing is trusted before
    the first one). Raises what the sync raised. The counts are the state's before the sync
    (what its snapshot holds: nothing else changes the state meanwhile), made first because
    the loop may let go of the state and the snapshot's maps once planned."""
    services, endpoints = loop.box.state.services_map(), loop.box.state.endpoints_map()
    ports, names = len(services), len({spn.service for spn in services})
    ready, addresses, not_ready = endpoint_counts(services, endpoints)
    del services, endpoints
    outcome = loop.sync_or_raise()
    return SyncReport(
        services=names,
        service_ports=ports,
        endpoints=ready,
        addresses=addresses,
        result=outcome.result,
        seconds=outcome.seconds,
        not_ready=not_ready,
    )
