"""Localhost NodePorts in the nftables mode (KEP-6032, gate KubeProxyNFTablesLocalhostNodePorts):
nftables cannot DNAT 127.0.0.1 or ::1 (there is no route_localnet for it), so the agent listens
on the loopback address itself and relays each TCP connection to an endpoint that the NodePort's
externalTrafficPolicy allows. Pure: which listeners a node wants."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import Protocol, ServicePort, ServicePortName
from kproxy.plan.port_policy import decide_port_policy, view_port

GATE = "KubeProxyNFTablesLocalhostNodePorts"
LOOPBACK = {4: "127.0.0.1", 6: "::1"}


@dataclass(frozen=True, slots=True)
class LocalhostNodePort:
    """One TCP NodePort on one family's loopback address. No endpoints: the listener stays and
    resets each connection (counted as rejected), as the NodePort on a node address rejects."""

    name: ServicePortName
    family: int
    node_port: int
    endpoints: tuple[tuple[str, int], ...]
    affinity_seconds: int | None = None

    @property
    def address(self) -> str:
        return LOOPBACK[self.family]


def serves_localhost(config: ProxyConfig, family: int) -> bool:
    """The gate is on, and nodePortAddresses is unset or covers this family's loopback address
    (upstream's gate needs `localhost` or a loopback CIDR in nodePortAddresses; kproxy's unset
    default counts too: the gate alone is the opt-in)."""
    if not config.feature_enabled(GATE):
        return False
    if not config.node_port_addresses:
        return True
    loopback = ipaddress.ip_address(LOOPBACK[family])
    return any(
        cidr != "primary" and loopback in ipaddress.ip_network(cidr)
        for cidr in config.node_port_addresses
    )


def plan_localhost_node_ports(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    node: NodeInfo,
    config: ProxyConfig,
    families: tuple[int, ...],
) -> tuple[LocalhostNodePort, ...]:
    """A listener per TCP NodePort per family the gate serves, with the endpoints external
    traffic reaches (externalTrafficPolicy Local: this node's only). UDP and SCTP NodePorts get
    none: the relay serves TCP only, as upstream's (the kernel answers port unreachable)."""
    wanted = []
    for family in families:
        if not serves_localhost(config, family):
            continue
        for spn in sorted(services, key=str):
            sp = services[spn]
            view = view_port(sp, family)
            if not sp.node_port or sp.protocol is not Protocol.TCP or view is None:
                continue
            policy = decide_port_policy(view, endpoints.get(spn, ()), node.name, node.zone)
            chosen = policy.cats.local if sp.external_policy_local else policy.cats.cluster
            wanted.append(
                LocalhostNodePort(
                    spn,
                    family,
                    sp.node_port,
                    tuple((ep.ip, ep.port) for ep in chosen),
                    sp.session_affinity_seconds,
                )
            )
    return tuple(wanted)
