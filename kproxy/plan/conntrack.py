"""Which UDP flows are stale: pure facts for conntrack cleanup (dataplane/conntrack.py deletes).

UDP has no connection end: a client that keeps sending to a service refreshes its conntrack entry,
which keeps pointing at the endpoint chosen when the flow began, or at nothing if the flow began
before the rules existed. After a sync that changed a UDP service's endpoints, every UDP flow whose
original destination is a service address (or a NodePort) but whose reply comes from an address
that is no longer a serving endpoint is stale, so the next datagram is load-balanced afresh.
TCP and SCTP flows are left alone, as upstream does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kproxy.model.endpoint import Endpoint
from kproxy.model.service import Protocol, ServicePort, ServicePortName

ANY_ADDRESS = "*"  # NodePort flows match on the port alone

# (service address or ANY_ADDRESS, port) -> the endpoint addresses allowed to answer.
UdpServing = Mapping[tuple[str, int], frozenset[str]]


@dataclass(frozen=True, slots=True)
class Flow:
    orig_dst: str
    orig_dport: int
    reply_src: str
    entry: Any = None  # the kernel's entry, to delete it by


def serving_sources(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    family: int,
) -> dict[tuple[str, int], frozenset[str]]:
    """(service address, port) -> the endpoint addresses allowed to answer, for UDP ports."""
    allowed: dict[tuple[str, int], frozenset[str]] = {}
    for spn, sp in services.items():
        if spn.protocol is not Protocol.UDP:  # the key's field: cheaper than the property
            continue
        serving = frozenset(
            ep.ip for ep in endpoints.get(spn, ()) if ep.serving and ep.family == family
        )
        addresses = (*sp.cluster_ips, *sp.external_ips, *sp.load_balancer_ips)
        for address in addresses:
            if ipaddress.ip_address(address).version == family:
                allowed[(str(ipaddress.ip_address(address)), sp.port)] = serving
        if sp.node_port:
            allowed[(ANY_ADDRESS, sp.node_port)] = serving
    return allowed


def with_removed(
    previous: UdpServing, current: UdpServing
) -> dict[tuple[str, int], frozenset[str]]:
    """`current`, plus every UDP service address a previous sync served and this one does not,
    with nothing allowed to answer: a flow to a removed UDP service (or userspace portal) is
    stale whatever answers it, or its client keeps reaching the old endpoint (or proxy port)."""
    allowed = {key: frozenset[str]() for key in previous}
    allowed.update(current)
    return allowed


def stale_flows(flows: Iterable[Flow], allowed: UdpServing) -> list[Flow]:
    """Flows to a UDP service address whose replies come from anything but a serving endpoint."""
    stale = []
    for flow in flows:
        sources = allowed.get((flow.orig_dst, flow.orig_dport))
        if sources is None:
            sources = allowed.get((ANY_ADDRESS, flow.orig_dport))
        if sources is not None and flow.reply_src not in sources:
            stale.append(flow)
    return stale
