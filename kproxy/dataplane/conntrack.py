"""Stale UDP conntrack flows, found and deleted over netlink (pyroute2), as upstream's reconciler.

UDP has no connection end: a client that keeps sending to a service refreshes its conntrack entry,
which keeps pointing at the endpoint chosen when the flow began, or at nothing if the flow began
before the rules existed. After a sync that changed a UDP service's endpoints, every UDP flow whose
original destination is a service address (or a NodePort) but whose reply comes from an address
that is no longer a serving endpoint is deleted, so the next datagram is load-balanced afresh.
TCP and SCTP flows are left alone, as upstream does.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyroute2 import Conntrack

from kproxy.model.endpoint import Endpoint
from kproxy.model.service import Protocol, ServicePort, ServicePortName

UDP = 17
ANY_ADDRESS = "*"  # NodePort flows match on the port alone


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
        if sp.protocol is not Protocol.UDP:
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


def stale_flows(
    flows: Iterable[Flow], allowed: Mapping[tuple[str, int], frozenset[str]]
) -> list[Flow]:
    """Flows to a UDP service address whose replies come from anything but a serving endpoint."""
    stale = []
    for flow in flows:
        sources = allowed.get((flow.orig_dst, flow.orig_dport))
        if sources is None:
            sources = allowed.get((ANY_ADDRESS, flow.orig_dport))
        if sources is not None and flow.reply_src not in sources:
            stale.append(flow)
    return stale


def _flows(ct: Conntrack) -> list[Flow]:
    # Filtering in the kernel by protocol returns nothing for IPv6 here, so filter in Python.
    flows = []
    for entry in list(ct.dump_entries()):
        orig, reply = entry.tuple_orig, entry.tuple_reply
        if orig is None or reply is None or orig.proto != UDP:
            continue
        flows.append(
            Flow(
                orig_dst=str(ipaddress.ip_address(orig.daddr)),
                orig_dport=int(orig.dport),
                reply_src=str(ipaddress.ip_address(reply.saddr)),
                entry=entry,
            )
        )
    return flows


def delete_stale_udp_flows(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
    families: Iterable[int] = (4, 6),
) -> list[Flow]:
    """Delete stale UDP flows in this network namespace; returns what was deleted."""
    deleted = []
    for family in families:
        allowed = serving_sources(services, endpoints, family)
        if not allowed:
            continue
        ct = Conntrack(nfgen_family=socket.AF_INET if family == 4 else socket.AF_INET6)
        try:
            for flow in stale_flows(_flows(ct), allowed):
                ct.delete(flow.entry)
                deleted.append(flow)
        finally:
            ct.close()
    return deleted
