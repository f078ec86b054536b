"""Which UDP flows are stale: pure facts for conntrack cleanup (dataplane/conntrack.py asks the
kernel and deletes).

UDP has no connection end: a client that keeps sending to a service refreshes its conntrack entry,
which keeps pointing at the endpoint chosen when the flow began, or at nothing if the flow began
before the rules existed. A UDP flow whose original destination is a service address (or a
NodePort) but whose reply comes from an address that is no longer a serving endpoint is stale, so
the next datagram is load-balanced afresh. TCP and SCTP flows are left alone, as upstream does.

Only the service addresses whose serving endpoints changed since their flows were last cleaned
are looked at (all of them after a start), and the kernel is asked for the flows to those alone:
a node's table holds hundreds of thousands of flows, nearly all of them fine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kproxy.model.endpoint import Endpoint
from kproxy.model.service import Protocol, ServicePort, ServicePortName

ANY_ADDRESS = "*"  # NodePort flows match on the port alone

# (service address or ANY_ADDRESS, port): the flows of one UDP service address.
UdpKey = tuple[str, int]
# UdpKey -> the endpoint addresses allowed to answer.
UdpServing = Mapping[UdpKey, frozenset[str]]


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


def plan_cleanup(cleaned: UdpServing, serving: UdpServing) -> dict[UdpKey, frozenset[str]]:
    """The keys whose flows need a look, each with what may answer now: those whose allowed
    sources differ from when their flows were last cleaned (new ones too), and those no longer
    served, where nothing may answer: a flow to a removed UDP service (or userspace portal) is
    stale whatever answers it, or its client keeps reaching the old endpoint (or proxy port)."""
    work = {key: allowed for key, allowed in serving.items() if cleaned.get(key) != allowed}
    work.update((key, frozenset()) for key in cleaned if key not in serving)
    return work


def with_cleaned(
    cleaned: UdpServing, serving: UdpServing, done: Iterable[UdpKey]
) -> dict[UdpKey, frozenset[str]]:
    """`cleaned` once the flows of the `done` keys have been cleaned against `serving`."""
    after = dict(cleaned)
    for key in done:
        if key in serving:
            after[key] = serving[key]
        else:
            after.pop(key, None)
    return after


@dataclass(frozen=True, slots=True)
class FlowQuery:
    """One request to the kernel for the UDP flows to `port` (and to `address`, which the kernel
    then filters on too), answering for `keys`. With `flush`, every such flow is stale and the
    kernel deletes them all itself, handing none out."""

    port: int
    address: str | None
    keys: tuple[UdpKey, ...]
    flush: bool = False


def plan_queries(
    work: UdpServing, serving: UdpServing, family: int, can_flush: bool
) -> list[FlowQuery]:
    """The fewest narrow requests that find the stale flows of `work`'s keys. IPv4 flows are
    filtered in the kernel on protocol, port and destination. IPv6 ones on protocol and port
    alone: the kernel's IPv6 address filter is inverted (measured on 6.18: it hands out the flows
    to every other address), so addresses are compared here. A NodePort key means its port on
    any address, so it is one request for the port, flushed only when no service address on
    that port is served (or being cleaned): their flows are not the NodePort's."""
    by_port: dict[int, list[UdpKey]] = {}
    for key in sorted(work):
        by_port.setdefault(key[1], []).append(key)
    queries = []
    for port, keys in by_port.items():
        if family == 4 and all(address != ANY_ADDRESS for address, _ in keys):
            queries += [
                FlowQuery(port, a, ((a, port),), can_flush and not work[a, port]) for a, _ in keys
            ]
            continue
        others = any(a != ANY_ADDRESS and p == port for a, p in (*serving, *work))
        flush = can_flush and not others and not any(work[key] for key in keys)
        queries.append(FlowQuery(port, None, tuple(keys), flush))
    return queries


def is_stale(dst: str, dport: int, reply_src: str, work: UdpServing, serving: UdpServing) -> bool:
    """Whether a flow to dst:dport answered by `reply_src` is stale and one of `work`'s: its
    service address (or else its NodePort) is being cleaned and may not answer from there."""
    key = (dst, dport)
    if key not in work and key not in serving:
        key = (ANY_ADDRESS, dport)
    allowed = work.get(key)
    return allowed is not None and reply_src not in allowed


@dataclass
class CleanupReport:
    """What one cleanup did."""

    done: dict[int, list[UdpKey]] = field(default_factory=dict)  # per family: cleaned keys
    deleted: int = 0  # flows read and deleted one by one
    flushed: int = 0  # keys whose flows the kernel deleted by filter (it does not count them)
    read: int = 0  # flows the kernel handed out
    left: int = 0  # keys left for the next sync: the time allowed ran out
