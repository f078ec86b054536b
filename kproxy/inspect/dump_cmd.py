"""`kproxy dump`: kproxy's rules as the mode's own tools show them, live from this node's kernel or
as sync would write them for some manifests."""

from __future__ import annotations

from kproxy.inspect.inputs import (
    build_state,
    in_live_mode,
    load_config_file,
    node_and_config,
    read_manifests,
    with_host_facts,
)
from kproxy.sync.modes import proxy_mode

# Planned userspace rules name no relay port: sync binds the listeners, and the kernel picks them.
RELAY_PORT_NOTE = (
    "# port 0 (--to-ports 0, --to-destination ADDRESS:0, --dport 0) stands for a relay "
    "listener's port, which sync picks when it binds the listener; `kproxy dump` without "
    "--manifests shows the ports in use\n"
)


def dump_live(config_path: str | None, family: int) -> str:
    """What the kernel holds of the node's mode (detected when no --config is given)."""
    config = in_live_mode(load_config_file(config_path), config_path, family)
    return proxy_mode(config).read_live(family)


def dump_planned(
    manifests_path: str, family: int, config_path: str | None, hostname: str | None
) -> str:
    """What sync would write for these manifests on this node (no root needed)."""
    manifests = read_manifests(manifests_path)
    node, config = node_and_config(manifests, config_path, hostname)
    state = build_state(manifests, config)
    mode = proxy_mode(config)
    plan = mode.planner(config).plan(
        state.services_map(), state.endpoints_map(), with_host_facts(node), (family,)
    )
    text = mode.render_plan(plan, family)
    return RELAY_PORT_NOTE + text if mode.serves_in_process else text
