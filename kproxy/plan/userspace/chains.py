"""The userspace mode's chains: upstream kube-proxy's userspace proxier used these five names,
so kproxy's cleanup and `kube-proxy --cleanup` each remove the other's leftovers."""

from __future__ import annotations

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL = "KUBE-NODEPORT-NON-LOCAL"

NAT_CHAINS = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
FILTER_CHAINS = (NODEPORT_NON_LOCAL,)
USERSPACE_CHAINS = frozenset(NAT_CHAINS + FILTER_CHAINS)

# The jump rules' comments are their identity for upstream's cleanup: byte for byte.
PORTALS_COMMENT = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
NODEPORTS_COMMENT = "handle service NodePorts; NOTE: this must be the last rule in the chain"
NON_LOCAL_COMMENT = "Ensure that non-local NodePort traffic can flow"


def is_userspace_chain(name: str) -> bool:
    """Chains the userspace mode creates, rewrites and deletes outright (no per-service ones)."""
    return name in USERSPACE_CHAINS
