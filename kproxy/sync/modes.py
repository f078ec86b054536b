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
from kproxy.model.config import ProxyConfig
from kproxy.plan.iptables.planner import IptablesPlanner, render_iptables_plan
from kproxy.plan.node_plan import NodePlan, Planner


@dataclass(frozen=True)
class ProxyMode:
    name: str
    planner: Callable[[ProxyConfig], Planner[Any]]
    open_dataplane: Callable[[float], AbstractContextManager[ModeDataplane]]
    # What `dump --manifests` prints for one family: the plan as the mode's own tools show it;
    # and what plain `dump` prints: what the kernel holds of the mode's, in the same form.
    render_plan: Callable[[NodePlan[Any], int], str]
    read_live: Callable[[int], str]


MODES = {
    "iptables": ProxyMode(
        "iptables", IptablesPlanner, open_iptables_node, render_iptables_plan, read_iptables_live
    ),
}


def proxy_mode(config: ProxyConfig) -> ProxyMode:
    """The mode a node runs. Only iptables exists yet (`mode: ""` means iptables, as upstream)."""
    return MODES["iptables"]
