"""Stopping the userspace mode without failing a connection.

The userspace mode's data path is the relay in kproxy's own process: when the process ends, its
portal rules would send every new connection to a closed port. So before it stops, the agent
hands the node over to the iptables mode: one full iptables-mode sync of the same state replaces
the portals in the same commit per table (the diff deletes the other mode's chains), UDP flows
still aimed at the relay are deleted, and the relay lets the connections it carries finish. A
restart of the userspace mode, or a switch to another mode, then starts from rules that work: the
next agent's first sync replaces them in one commit of its own.
"""

from __future__ import annotations

import structlog

from kproxy.dataplane.userspace.node import UserspaceNode
from kproxy.errors import KproxyError
from kproxy.plan.iptables.planner import IptablesPlanner
from kproxy.sync.loop import SyncLoop

log = structlog.get_logger("kproxy.sync")

# How long connections being relayed may take to finish once the portals are gone (within the
# DaemonSet's terminationGracePeriodSeconds).
DRAIN_SECONDS = 10.0


def hand_over_to_iptables(loop: SyncLoop, drain_seconds: float = DRAIN_SECONDS) -> None:
    node = loop.dataplane
    if not isinstance(node, UserspaceNode):
        return
    try:
        snapshot = loop.take_snapshot()
        plan = IptablesPlanner(loop.config).plan(
            snapshot.services, snapshot.endpoints, snapshot.node, node.families
        )
        result = node.hand_over(plan)
    except KproxyError as exc:
        log.error("handover_failed", error=str(exc), portals="left in place")
        return
    loop.clean_stale_flows(plan, seconds=None)  # logs its own failure; stopping goes on
    still_open = node.drain(drain_seconds)
    log.info(
        "portals_handed_over",
        to_mode=plan.mode,
        chains_written=result.chains_written,
        chains_removed=result.chains_removed,
        connections_cut=still_open,
    )
