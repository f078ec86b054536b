"""How rules tell pod traffic from everything else (`detectLocalMode`), as upstream's
LocalTrafficDetector: by source CIDR (ClusterCIDR, NodeCIDR) or by input interface
(BridgeInterface, InterfaceNamePrefix)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.rules.ir import Rule


@dataclass(frozen=True, slots=True)
class LocalDetector:
    source_cidr: str | None = None
    in_iface: str | None = None

    @property
    def implemented(self) -> bool:
        return self.source_cidr is not None or self.in_iface is not None

    def if_local(self, rule: Rule) -> Rule:
        """`rule` restricted to pod traffic."""
        return replace(rule, src=self.source_cidr, in_iface=self.in_iface)

    def if_not_local(self, rule: Rule) -> Rule:
        """`rule` restricted to traffic not from pods."""
        if self.source_cidr is not None:
            return replace(rule, src=self.source_cidr, src_invert=True)
        return replace(rule, in_iface=self.in_iface, in_invert=True)


def _first_of_family(cidrs: tuple[str, ...], family: int) -> str | None:
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version == family:
            return str(net)
    return None


def build_local_detector(config: ProxyConfig, node: NodeInfo, family: int) -> LocalDetector:
    mode = config.detect_local_mode
    if mode == "ClusterCIDR":
        return LocalDetector(source_cidr=_first_of_family(config.cluster_cidrs, family))
    if mode == "NodeCIDR":
        return LocalDetector(source_cidr=_first_of_family(node.pod_cidrs, family))
    if mode == "BridgeInterface":
        return LocalDetector(in_iface=config.bridge_interface or None)
    if mode == "InterfaceNamePrefix":
        prefix = config.interface_name_prefix
        return LocalDetector(in_iface=prefix + "+" if prefix else None)
    return LocalDetector()
