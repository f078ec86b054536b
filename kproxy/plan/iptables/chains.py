"""Every chain name of the iptables mode, and which chains kproxy owns: one place, used by the
planner that writes them and by the dataplane that decides what it may delete."""

from __future__ import annotations

from kproxy.plan.iptables.naming import is_service_chain
from kproxy.plan.xtables import is_userspace_chain

# Top-level chains kproxy (and upstream kube-proxy's iptables mode) creates and owns outright.
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
# Written by kproxy but never deleted: kubelet creates the same chain and relies on it.
KUBE_FIREWALL = "KUBE-FIREWALL"

TOP_LEVEL_CHAINS = frozenset(
    {
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
        KUBE_PROXY_FIREWALL,
        KUBE_PROXY_CANARY,
    }
)
SHARED_CHAINS = frozenset({KUBE_FIREWALL})


def is_owned_chain(name: str) -> bool:
    """Chains kproxy may create, rewrite and delete: the top-level ones and every per-service
    chain (KUBE-SVC-, KUBE-SEP-, ...). KUBE-FIREWALL is shared with kubelet, and
    KUBE-KUBELET-CANARY/KUBE-IPTABLES-HINT are kubelet's, so they are not."""
    return name in TOP_LEVEL_CHAINS or is_service_chain(name)


def is_written_chain(name: str) -> bool:
    """Chains kproxy writes: its own and the shared ones (what `dump` shows)."""
    return is_owned_chain(name) or name in SHARED_CHAINS


def is_cleanup_chain(name: str) -> bool:
    """Chains `kproxy cleanup` removes: every mode's, so a node left by either mode (or by
    upstream's userspace proxier) is clean. A sync never deletes the other mode's chains: their
    jump rules would still reference them."""
    return is_owned_chain(name) or is_userspace_chain(name)
