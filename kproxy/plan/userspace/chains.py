"""The userspace mode's chains (named in plan/xtables.py, which the iptables mode reads too) and
the comments of the jumps to them."""

from __future__ import annotations

from kproxy.plan.xtables import (
    NODEPORT_CONTAINER,
    NODEPORT_HOST,
    NODEPORT_NON_LOCAL,
    PORTALS_CONTAINER,
    PORTALS_HOST,
    USERSPACE_FILTER_CHAINS,
    USERSPACE_NAT_CHAINS,
    is_userspace_chain,
)

__all__ = [
    "FILTER_CHAINS",
    "NAT_CHAINS",
    "NODEPORTS_COMMENT",
    "NODEPORT_CONTAINER",
    "NODEPORT_HOST",
    "NODEPORT_NON_LOCAL",
    "NON_LOCAL_COMMENT",
    "PORTALS_COMMENT",
    "PORTALS_CONTAINER",
    "PORTALS_HOST",
    "is_userspace_chain",
]

NAT_CHAINS = USERSPACE_NAT_CHAINS
FILTER_CHAINS = USERSPACE_FILTER_CHAINS

# The jump rules' comments are their identity for upstream's cleanup: byte for byte.
PORTALS_COMMENT = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
NODEPORTS_COMMENT = "handle service NodePorts; NOTE: this must be the last rule in the chain"
NON_LOCAL_COMMENT = "Ensure that non-local NodePort traffic can flow"
