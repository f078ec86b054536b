"""Where the iptables mode's rules are on a simulated node, for tests that read or edit them:
kproxy's `auto` writes the backend kubelet uses (real_node.py seeds kubelet's chains in one), and
nft on a node without kubelet; the userspace mode's portals are always legacy rules."""

from __future__ import annotations

from integration.netns import Topology


def mode_backend(topo: Topology, mode: str = "iptables") -> str:
    """`nft` or `legacy`: the backend the proxy mode writes on this node with default config."""
    if mode == "userspace":
        return "legacy"
    return topo.foreign.kubelet if topo.foreign is not None else "nft"


def save_tool(backend: str, family: int = 4) -> str:
    """`iptables-nft-save`, `ip6tables-legacy-save`, ..."""
    return f"{iptables_tool(backend, family)}-save"


def iptables_tool(backend: str, family: int = 4) -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-{backend}"
