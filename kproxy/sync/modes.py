"""The proxy modes: everything the rest of the agent asks of a mode, one entry per mode. A mode is
a planner (pure: snapshot -> NodePlan, in plan/<mode>/) and a dataplane that carries its plans
out (dataplane/<mode>/); everything else (sources, state, the sync loop, health, metrics,
conntrack cleanup, `cleanup`, `doctor`) is shared and reaches the mode through its entry here.
A new mode adds plan/<mode>/, dataplane/<mode>/ and one entry in MODES (docs/architecture.md,
"Adding a mode")."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from kproxy.dataplane.base import ChainDiff, ModeDataplane, NodeNeeds, TableReport
from kproxy.dataplane.iptables.needs import IPTABLES_NEEDS
from kproxy.dataplane.leftovers import LeftoverRemoval
from kproxy.dataplane.nftables.needs import NFTABLES_NEEDS
from kproxy.dataplane.userspace.needs import USERSPACE_NEEDS
from kproxy.model.config import ProxyConfig
from kproxy.model.config_values import DEFAULT_MODE
from kproxy.plan.iptables.planner import IptablesPlanner, render_iptables_plan
from kproxy.plan.nftables import naming as nft_naming
from kproxy.plan.nftables.planner import NftablesPlanner, render_nftables_plan
from kproxy.plan.node_plan import NodePlan, Planner
from kproxy.plan.userspace.planner import UserspacePlanner, render_userspace_plan
from kproxy.rules.explain import Traceable

if TYPE_CHECKING:
    from kproxy.sync.loop import SyncLoop


@dataclass(frozen=True)
class Deferred:
    """A function of a mode's dataplane (or of the sync package), named by module and imported
    at its first call, so that commands which only plan (`--help`, `dump --manifests`, `trace
    --manifests`) load no kernel library. Equal when they name the same function, as the
    removals shared by two modes must be."""

    module: str
    name: str

    def target(self) -> Callable[..., Any]:
        function: Callable[..., Any] = getattr(importlib.import_module(self.module), self.name)
        return function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target()(*args, **kwargs)


class OpenDataplane(Protocol):
    """(config, lock timeout) -> the mode's dataplane, open for the agent's lifetime; `once`:
    for one sync (`sync --once`), so it keeps nothing for a next one."""

    def __call__(
        self, config: ProxyConfig, lock_timeout: float, once: bool = False
    ) -> AbstractContextManager[ModeDataplane]: ...


@dataclass(frozen=True)
class LeftoverPlace:
    """Where proxy modes leave rules on a node, with the removal of every mode's rules there,
    kproxy's and kube-proxy's (lock timeout -> per table, what it removed)."""

    where: str  # legacy, iptables-nft or nftables
    remove: Callable[[float], Sequence[TableReport]]


@dataclass(frozen=True)
class ProxyMode:
    name: str
    planner: Callable[[ProxyConfig], Planner[Any]]
    open_dataplane: OpenDataplane
    # Where its rules may be on a node. The sync loop runs, once after the mode's first commit,
    # the removal of every other mode's place that is not one of these; `cleanup` runs them all.
    leftovers: tuple[LeftoverPlace, ...]
    # The tables its rules gauges count, as their `table` label: a table an apply reports
    # (`nat`, or with its family, `ip kube-proxy`) counts under its last word.
    rule_tables: tuple[str, ...]
    # What it needs of the node, for `kproxy doctor`.
    needs: NodeNeeds
    # What `dump --manifests` prints for one family: the plan as the mode's own tools show it;
    # and what plain `dump` prints: what the kernel holds of the mode's, in the same form.
    render_plan: Callable[[NodePlan[Any], int], str]
    read_live: Callable[[int], str]
    # For `kproxy trace`: one family's tables for the tracer, read from the kernel in one
    # snapshot (family, lock timeout), or as planned.
    trace_live: Callable[[int, float], Traceable]
    trace_plan: Callable[[NodePlan[Any], int], Traceable]
    # For `kproxy dump --diff`: what the next sync of a plan would change, per chain or object.
    diff: Callable[[NodePlan[Any], int, float], list[ChainDiff]]
    # Its data path runs inside the kproxy process (the userspace relay): `sync --once` then
    # keeps serving until SIGTERM instead of returning.
    serves_in_process: bool = False
    # What the agent does as it stops, after its last sync: by default nothing (the rules stay,
    # so traffic does not stop while the agent restarts); see sync/handover.py.
    on_stop: Callable[[SyncLoop], None] = lambda loop: None


_IPTABLES = "kproxy.dataplane.iptables"
_NFTABLES = "kproxy.dataplane.nftables"
_USERSPACE = "kproxy.dataplane.userspace"
_READ_XTABLES_LIVE = Deferred("kproxy.dataplane.xtables.preview", "read_xtables_live")


def _open_iptables(config: ProxyConfig, lock_timeout: float, once: bool = False) -> Any:
    return Deferred(f"{_IPTABLES}.node", "open_iptables_node")(
        lock_timeout, config.iptables_backend, once
    )


def _open_nftables(config: ProxyConfig, lock_timeout: float, once: bool = False) -> Any:
    return Deferred(f"{_NFTABLES}.node", "open_nftables_mode")(config)


def _open_userspace(config: ProxyConfig, lock_timeout: float, once: bool = False) -> Any:
    # `sync --once` goes on relaying (and hands over as it stops): its dataplane keeps all.
    return Deferred(f"{_USERSPACE}.node", "open_userspace_node")(config, lock_timeout)


def _remove_nftables_leftovers(lock_timeout: float) -> Sequence[TableReport]:
    # nf_tables has no lock: its transactions are atomic.
    removed: Sequence[TableReport] = Deferred(f"{_NFTABLES}.node", "remove_nftables_mode")()
    return removed


_XTABLES = "kproxy.dataplane.xtables.backends"
# The iptables mode writes the legacy tables or iptables-nft's (kubelet's backend), and
# removes its chains from the other one itself; the userspace mode's portals are legacy rules.
LEGACY_XTABLES = LeftoverPlace("legacy", Deferred(_XTABLES, "remove_legacy_backend"))
IPTABLES_NFT = LeftoverPlace("iptables-nft", Deferred(_XTABLES, "remove_nft_backend"))
NFTABLES_TABLE = LeftoverPlace("nftables", _remove_nftables_leftovers)


MODES = {
    mode.name: mode
    for mode in (
        ProxyMode(
            name="iptables",
            planner=IptablesPlanner,
            open_dataplane=_open_iptables,
            leftovers=(LEGACY_XTABLES, IPTABLES_NFT),
            rule_tables=("filter", "nat"),
            needs=IPTABLES_NEEDS,
            render_plan=render_iptables_plan,
            read_live=_READ_XTABLES_LIVE,
            trace_live=Deferred(f"{_IPTABLES}.inspection", "iptables_live_tables"),
            trace_plan=Deferred(f"{_IPTABLES}.inspection", "iptables_plan_tables"),
            diff=Deferred(f"{_IPTABLES}.inspection", "iptables_diff"),
        ),
        ProxyMode(
            name="nftables",
            planner=NftablesPlanner,
            open_dataplane=_open_nftables,
            leftovers=(NFTABLES_TABLE,),
            rule_tables=(nft_naming.TABLE,),  # one per family, summed
            needs=NFTABLES_NEEDS,
            render_plan=render_nftables_plan,
            read_live=Deferred(f"{_NFTABLES}.inspection", "read_nftables_live"),
            trace_live=Deferred(f"{_NFTABLES}.inspection", "nftables_live_tables"),
            trace_plan=Deferred(f"{_NFTABLES}.inspection", "nftables_plan_tables"),
            diff=Deferred(f"{_NFTABLES}.inspection", "nftables_diff"),
        ),
        ProxyMode(
            name="userspace",
            planner=UserspacePlanner,
            open_dataplane=_open_userspace,
            leftovers=(LEGACY_XTABLES,),
            rule_tables=("filter", "nat"),  # the portals, in nat
            needs=USERSPACE_NEEDS,
            render_plan=render_userspace_plan,
            read_live=Deferred(f"{_USERSPACE}.inspection", "read_userspace_live"),
            trace_live=Deferred(f"{_USERSPACE}.inspection", "userspace_live_tables"),
            trace_plan=Deferred(f"{_USERSPACE}.inspection", "userspace_plan_tables"),
            diff=Deferred(f"{_USERSPACE}.inspection", "userspace_diff"),
            serves_in_process=True,
            on_stop=Deferred("kproxy.sync.handover", "hand_over_to_iptables"),
        ),
    )
}


def proxy_mode(config: ProxyConfig) -> ProxyMode:
    """The mode a node runs (`mode: ""` means iptables, as upstream)."""
    return MODES[config.mode or DEFAULT_MODE]


def _places(modes: list[ProxyMode]) -> list[LeftoverPlace]:
    return list(dict.fromkeys(place for mode in modes for place in mode.leftovers))


def other_modes_leftovers(mode: ProxyMode, lock_timeout: float) -> list[LeftoverRemoval]:
    """What the sync loop runs after `mode`'s first commit: the removal of every other mode's
    place, once each, except the mode's own (that would remove what it has just written)."""
    others = [p for p in _places(list(MODES.values())) if p not in mode.leftovers]
    return [LeftoverRemoval(partial(place.remove, lock_timeout)) for place in others]


def remove_every_mode(lock_timeout: float) -> list[TableReport]:
    """`kproxy cleanup`: every mode's leftovers, each place once; per table, what it removed."""
    places = _places(list(MODES.values()))
    return [table for place in places for table in place.remove(lock_timeout)]


def mode_needs() -> dict[str, NodeNeeds]:
    """What each mode needs of the node, for `kproxy doctor`."""
    return {name: mode.needs for name, mode in MODES.items()}
