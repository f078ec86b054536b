"""The node kproxy runs on."""

from __future__ import annotations

from dataclasses import dataclass, field

ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    pod_cidrs: tuple[str, ...] = ()

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")
