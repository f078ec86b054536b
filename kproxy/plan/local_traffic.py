"""How a mode tells pod traffic from everything else (`detectLocalMode`), as upstream's
LocalTrafficDetector: by source CIDR (ClusterCIDR, NodeCIDR) or by input interface
(BridgeInterface, InterfaceNamePrefix). Each mode writes the detector as its own matches."""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.plan.addresses import first_cidr_of_family


@dataclass(frozen=True, slots=True)
class LocalDetector:
    source_cidr: str | None = None
    in_iface: str | None = None  # `veth+` is a prefix

    @property
    def implemented(self) -> bool:
        return self.source_cidr is not None or self.in_iface is not None


def build_local_detector(config: ProxyConfig, node: NodeInfo, family: int) -> LocalDetector:
    mode = config.detect_local_mode
    if mode == "ClusterCIDR":
        return LocalDetector(source_cidr=first_cidr_of_family(config.cluster_cidrs, family))
    if mode == "NodeCIDR":
        return LocalDetector(source_cidr=first_cidr_of_family(node.pod_cidrs, family))
    if mode == "BridgeInterface":
        return LocalDetector(in_iface=config.bridge_interface or None)
    if mode == "InterfaceNamePrefix":
        prefix = config.interface_name_prefix
        return LocalDetector(in_iface=prefix + "+" if prefix else None)
    return LocalDetector()
