"""`kproxy dump --diff`: what the next sync would change on this node, per chain (or per object,
for a mode that writes objects rather than chains)."""

from __future__ import annotations

from kproxy.dataplane.base import ChainDiff
from kproxy.inspect.inputs import (
    build_state,
    in_live_mode,
    load_config_file,
    node_and_config,
    node_families,
    read_cluster_objects,
    read_manifests,
    with_host_facts,
)
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


def show_diff(
    manifests_path: str | None,
    kubeconfig: str | None,
    family: int | None,
    lock_timeout: float,
    config_path: str | None,
    hostname: str | None,
) -> str:
    """The diff text for --manifests, or (without them) the objects the API server holds; empty
    when the next sync would change nothing."""
    if manifests_path is not None:
        manifests = read_manifests(manifests_path)
    else:
        manifests = read_cluster_objects(kubeconfig, load_config_file(config_path), hostname)
    node, config = node_and_config(manifests, config_path, hostname)
    families = (family,) if family else node_families()
    config = in_live_mode(config, config_path, families[0])
    state = build_state(manifests, config)
    diffs = diff_next_sync(state, with_host_facts(node), config, families, lock_timeout)
    return render_diffs(diffs)
