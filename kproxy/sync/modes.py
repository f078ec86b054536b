"""The proxy modes: each is a planner (pure: snapshot -> NodePlan) and a dataplane that carries
its plans out. Everything else (sources, state, the sync loop, health, metrics, conntrack
cleanup) is shared. A new mode adds plan/<mode>/, dataplane/<mode>/ and one entry here."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from kproxy.dataplane.base import ChainDiff, ModeDataplane
from kproxy.dataplane.iptables.node import open_iptables_node, read_iptables_live
from kproxy.dataplane.nftables.mode import open_nftables_mode
from kproxy.dataplane.nftables.node import read_nftables_live
from kproxy.dataplane.userspace.node import open_userspace_node
from kproxy.model.config import ProxyConfig
from kproxy.plan.iptables.planner import IptablesPlanner, render_iptables_plan
from kproxy.plan.nftables.planner import NftablesPlanner, render_nftables_plan
from kproxy.plan.node_plan import NodePlan, Planner
from kproxy.plan.userspace.planner import UserspacePlanner, render_userspace_plan
from kproxy.rules.explain import Traceable
from kproxy.sync.handover import hand_over_to_iptables
from kproxy.sync.inspection import (
    iptables_diff,
    iptables_plan_tables,
    read_legacy_live_tables,
    read_live_tables,
    userspace_diff,
    userspace_plan_tables,
)
from kproxy.sync.loop import SyncLoop
from kproxy.sync.nft_inspection import nftables_diff, nftables_live_tables, nftables_plan_tables


@dataclass(frozen=True)
class ProxyMode:
    name: str
    planner: Callable[[ProxyConfig], Planner[Any]]
    open_dataplane: Callable[[ProxyConfig, float], AbstractContextManager[ModeDataplane]]
    # What `dump --manifests` prints for one family: the plan as the mode's own tools show it;
    # and what plain `dump` prints: what the kernel holds of the mode's, in the same form.
    render_plan: Callable[[NodePlan[Any], int], str]
    read_live: Callable[[int], str]
    # For `kproxy trace` (sync/inspection.py): one family's tables for the tracer, read from
    # the kernel in one snapshot (family, lock timeout), or as planned.
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


MODES = {
    "iptables": ProxyMode(
        "iptables",
        IptablesPlanner,
        lambda config, lock_timeout: open_iptables_node(lock_timeout, config.iptables_backend),
        render_iptables_plan,
        read_iptables_live,
        read_live_tables,
        iptables_plan_tables,
        iptables_diff,
    ),
    "nftables": ProxyMode(
        "nftables",
        NftablesPlanner,
        lambda config, lock_timeout: open_nftables_mode(lock_timeout),
        render_nftables_plan,
        read_nftables_live,
        nftables_live_tables,
        nftables_plan_tables,
        nftables_diff,
    ),
    "userspace": ProxyMode(
        "userspace",
        UserspacePlanner,
        open_userspace_node,
        render_userspace_plan,
        lambda family: read_iptables_live(family, "legacy"),  # its portals are legacy rules
        read_legacy_live_tables,
        userspace_plan_tables,
        userspace_diff,
        serves_in_process=True,
        on_stop=hand_over_to_iptables,
    ),
}


def proxy_mode(config: ProxyConfig) -> ProxyMode:
    """The mode a node runs (`mode: ""` means iptables, as upstream)."""
    return MODES[config.mode or "iptables"]
