"""`kproxy dump --diff`: what the next sync would change on this node, per chain (or per object,
for a mode that writes objects rather than chains)."""

from __future__ import annotations

from kproxy.dataplane.base import ChainDiff
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.state.cluster import ClusterState
from kproxy.sync.modes import proxy_mode


def diff_next_sync(
    state: ClusterState,
    node: NodeInfo,
    config: ProxyConfig,
    families: tuple[int, ...],
    lock_timeout: float,
) -> list[ChainDiff]:
    """The mode's plan for `state`, compared with what the kernel holds now."""
    mode = proxy_mode(config)
    plan = mode.planner(config).plan(state.services_map(), state.endpoints_map(), node, families)
    diffs: list[ChainDiff] = []
    for family in families:
        diffs.extend(mode.diff(plan, family, lock_timeout))
    return diffs


def render_diffs(diffs: list[ChainDiff]) -> str:
    """One unified diff per chain, with a summary line; nothing at all when nothing changes."""
    if not diffs:
        return ""
    counts: dict[str, int] = {}
    for d in diffs:
        counts[d.change] = counts.get(d.change, 0) + 1
    summary = ", ".join(f"{n} {change}" for change, n in sorted(counts.items()))
    lines = [f"# the next sync would change {len(diffs)} chains: {summary}"]
    for d in diffs:
        lines.append(f"# {d.change}: {d.table} {d.chain}")
        lines.extend(d.lines)
    return "\n".join(lines) + "\n"
