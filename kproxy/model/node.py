"""The node kproxy runs on: what the Node object says, and what its network namespace holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from kproxy.errors import InvalidObjectError

ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    pod_cidrs: tuple[str, ...] = ()
    # The Node object's InternalIP addresses (`nodePortAddresses: [primary]`).
    primary_ips: tuple[str, ...] = ()
    # Being deleted, or marked for deletion by the cluster autoscaler: /healthz says 503.
    draining: bool = False
    # Facts read from the node's own network namespace, not from the API.
    local_addresses: tuple[str, ...] = ()
    tcp_be_liberal: bool = False
    # The cluster's ServiceCIDR ranges (every object's spec.cidrs, sorted), carried with the
    # node so that a change to them reaches the planner as a change of what it plans for.
    service_cidrs: tuple[str, ...] = ()
    # Values of the Node object left out for a bad field, one error each (the caller warns).
    skipped: tuple[InvalidObjectError, ...] = field(default=(), compare=False, hash=False)

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")
