"""The other modes' leftovers, removed after a mode's first commit in this process: a node
switching modes in place gets the new mode's rules before the old mode's go, so traffic never
falls through. The sync loop runs one LeftoverRemoval per other mode (sync/modes.py); what it
removed is counted in that sync's ApplyResult (`sync --once`'s summary, the `sync_completed`
log, /statusz). A removal that fails is counted as a cleanup failure, never fails the sync
(whose own rules are in), and is retried after the next sync until it succeeds, as upstream
retries its stale-chain cleanup."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from kproxy.dataplane.base import ApplyResult, TableReport

log = structlog.get_logger("kproxy.dataplane")

# Removes the other modes' chains and tables; returns what it removed, per table.
RemoveLeftovers = Callable[[], Sequence[TableReport]]


class LeftoverRemoval:
    """Runs `remove` after each commit until it has succeeded once."""

    def __init__(self, remove: RemoveLeftovers | None) -> None:
        self._remove = remove

    def after_commit(self, result: ApplyResult) -> ApplyResult:
        """Add what the removal removed to `result`, or count its failure there."""
        if self._remove is None:
            return result
        try:
            removed = self._remove()
        except Exception as exc:  # whatever it was, the sync's own rules are in
            log.error("cleanup_failed", error=str(exc), retry="after the next sync")
            result.cleanup_failures += 1
            return result
        self._remove = None
        result.leftovers.extend(removed)
        return result
