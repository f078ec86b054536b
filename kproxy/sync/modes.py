"""The proxy modes: each is a planner (pure: snapshot -> NodePlan) and a dataplane that carries
its plans out. Everything else (sources, state, the sync loop, health, metrics, conntrack
cleanup) is shared. A new mode adds plan/<mode>/, dataplane/<mode>/ and one entry here."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from kproxy.dataplane.base import ModeDataplane
from kproxy.dataplane.iptables.node import open_iptables_node, read_iptables_live
from kproxy.dataplane.nftables.mode import open_nftables_mode
from kproxy.dataplane.nftables.node import read_nftables_live
from kproxy.dataplane.userspace.node import open_userspace_node
from kproxy.model.config import ProxyConfig
from kproxy.plan.iptables.planner import IptablesPlanner, render_iptables_plan
from kproxy.plan.nftables.planner import NftablesPlanner, render_nftables_plan
from kproxy.plan.node_plan import NodePlan, Planner
from kproxy.plan.userspace.planner import UserspacePlanner, render_userspace_plan


@dataclass(frozen=True)
class ProxyMode:
    name: str
    planner: Callable[[ProxyConfig], Planner[Any]]
    open_dataplane: Callable[[ProxyConfig, float], AbstractContextManager[ModeDataplane]]
    # What `dump --manifests` prints for one family: the plan as the mode's own tools show it;
    # and what plain `dump` prints: what the kernel holds of the mode's, in the same form.
    render_plan: Callable[[NodePlan[Any], int], str]
    read_live: Callable[[int], str]
    # Its data path runs inside the kproxy process (the userspace relay): `sync --once` then
    # keeps serving until SIGTERM instead of returning.
    serves_in_process: bool = False


MODES = {
    "iptables": ProxyMode(
        "iptables",
        IptablesPlanner,
        lambda config, lock_timeout: open_iptables_node(lock_timeout),
        render_iptables_plan,
        read_iptables_live,
    ),
    "nftables": ProxyMode(
        "nftables",
        NftablesPlanner,
        lambda config, lock_timeout: open_nftables_mode(lock_timeout),
        render_nftables_plan,
        read_nftables_live,
    ),
    "userspace": ProxyMode(
        "userspace",
        UserspacePlanner,
        open_userspace_node,
        render_userspace_plan,
        read_iptables_live,
        serves_in_process=True,
    ),
}


def proxy_mode(config: ProxyConfig) -> ProxyMode:
    """The mode a node runs (`mode: ""` means iptables, as upstream)."""
    return MODES[config.mode or "iptables"]
