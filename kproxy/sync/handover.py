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

import time
from collections.abc import Mapping, Sequence

import structlog

from kproxy.dataplane.base import ApplyResult
from kproxy.dataplane.userspace.node import UserspaceNode
from kproxy.plan.iptables.planner import IptablesPlanner
from kproxy.plan.node_plan import NodePlan
from kproxy.rules.ir import Ruleset
from kproxy.sync.loop import SyncLoop

log = structlog.get_logger("kproxy.sync")

# How long connections being relayed may take to finish once the portals are gone (within the
# DaemonSet's terminationGracePeriodSeconds).
DRAIN_SECONDS = 10.0
# Waits before the second and third attempt: a hand-over that failed for want of descriptors
# (EMFILE) or on a busy xtables lock may pass a moment later.
RETRY_WAITS: tuple[float, ...] = (0.5, 1.0)


def hand_over_to_iptables(
    loop: SyncLoop,
    drain_seconds: float = DRAIN_SECONDS,
    retry_waits: Sequence[float] | None = None,
) -> None:
    """Never raises: whatever fails (a KproxyError, an OSError such as EMFILE, anything) is
    retried, counted, and logged once; the agent then stops with the portals in place."""
    node = loop.dataplane
    if not isinstance(node, UserspaceNode):
        return
    errors: list[str] = []
    for wait in (*(RETRY_WAITS if retry_waits is None else retry_waits), None):
        try:
            plan, result = _hand_over(loop, node)
            break
        except Exception as exc:  # stopping goes on whatever went wrong
            loop.metrics.handover_failures.inc()
            errors.append(f"{type(exc).__name__}: {exc}")
            if wait is None:
                log.error(
                    "handover_failed",
                    error=errors[-1],
                    attempts=len(errors),
                    portals="left in place",
                )
                return
            time.sleep(wait)
    loop.clean_stale_flows(plan, seconds=None)  # logs its own failure; stopping goes on
    still_open = node.drain(drain_seconds)
    log.info(
        "portals_handed_over",
        to_mode=plan.mode,
        chains_written=result.chains_written,
        chains_removed=result.chains_removed,
        connections_cut=still_open,
        **({"failed_attempts": len(errors), "error": errors[-1]} if errors else {}),
    )


def _hand_over(
    loop: SyncLoop, node: UserspaceNode
) -> tuple[NodePlan[Mapping[int, Ruleset]], ApplyResult]:
    snapshot = loop.take_snapshot()
    plan = IptablesPlanner(loop.config).plan(
        snapshot.services, snapshot.endpoints, snapshot.node, node.families
    )
    return plan, node.hand_over(plan)
