"""Address facts every mode plans with, per family: the all-addresses and loopback CIDRs, a
family's share of a list of addresses, and the node's own IP."""

from __future__ import annotations

import ipaddress

from kproxy.model.addresses import ip_family
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo

ZERO_CIDR = {4: "0.0.0.0/0", 6: "::/0"}  # every address of a family
LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}


def of_family(addresses: tuple[str, ...], family: int) -> tuple[str, ...]:
    """The addresses or CIDRs (validated on the way in) of one family."""
    return tuple(a for a in addresses if ip_family(a) == family)


def first_cidr_of_family(cidrs: tuple[str, ...], family: int) -> str | None:
    """The first CIDR of the family, in its canonical form (host bits cleared)."""
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version == family:
            return str(net)
    return None


def node_ip(config: ProxyConfig, node: NodeInfo, family: int) -> str | None:
    """The node's IP of the family (for loadBalancerSourceRanges): the Node object's, else the
    configured bindAddress, else a local address that is not loopback."""
    ips = (
        of_family(node.primary_ips, family)
        or of_family((config.bind_address,) if config.bind_address else (), family)
        or tuple(
            ip
            for ip in of_family(node.local_addresses, family)
            if not ipaddress.ip_address(ip).is_loopback
        )
    )
    return ips[0] if ips else None
