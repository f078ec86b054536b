"""Where NodePorts answer (nodePortAddresses, as upstream reads it per family), and so where the
healthCheckNodePort servers listen: the same for every mode."""

from __future__ import annotations

import ipaddress

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.plan.addresses import ZERO_CIDR, of_family
from kproxy.rules import fragments as f


def node_port_cidrs(config: ProxyConfig, family: int, node: NodeInfo) -> tuple[str, ...]:
    """nodePortAddresses as upstream's NewNodePortAddresses reads them for one family: only that
    family's CIDRs, `primary` as the node's primary IP of that family; when none is left, the
    zero CIDR (every address), even if the other family has CIDRs."""
    cidrs: list[str] = []
    for address in config.node_port_addresses:
        if address == "primary":
            cidrs.extend(f.cidr(ip) for ip in of_family(node.primary_ips, family))
        elif ipaddress.ip_network(address).version == family:
            cidrs.append(address)
    return tuple(cidrs) or (ZERO_CIDR[family],)


def node_ports_match_all(config: ProxyConfig, family: int, node: NodeInfo) -> bool:
    """NodePorts answer on every local address of this family."""
    return ZERO_CIDR[family] in node_port_cidrs(config, family, node)


def node_port_ips(config: ProxyConfig, node: NodeInfo, family: int) -> list[str]:
    """The local addresses NodePorts answer on when nodePortAddresses narrows them."""
    cidrs = [ipaddress.ip_network(c) for c in node_port_cidrs(config, family, node)]
    chosen = {
        ip
        for ip in of_family(node.local_addresses, family)
        if any(ipaddress.ip_address(ip) in c for c in cidrs)
    }
    return sorted(chosen, key=ipaddress.ip_address)


def health_check_addresses(config: ProxyConfig, node: NodeInfo) -> tuple[str, ...]:
    """Where healthCheckNodePort servers listen: every address, or the NodePort addresses."""
    if node_ports_match_all(config, 4, node):
        return ("0.0.0.0",)
    return tuple(node_port_ips(config, node, 4) + node_port_ips(config, node, 6))
