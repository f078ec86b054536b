"""Which Service holds each ClusterIP, and which claim one of them as an externalIP or
load-balancer ingress IP. A claim on another Service's `ClusterIP:port/protocol` is left out of
the claiming port, so the ClusterIP's own rules always win, in every mode and whatever order the
services come in (upstream writes each service's ClusterIP rule before its external ones, but
services in Go's random map order, so a claimer can win there; kproxy's sorted order would let
one whose name sorts first win every time)."""

from __future__ import annotations

from dataclasses import replace

from kproxy.errors import InvalidObjectError
from kproxy.model.service import NamespacedName, Protocol, ServicePort

AddressKey = tuple[str, int, Protocol]  # ip, port, protocol
# What a service was last warned about: (field, ip, port, protocol, holder).
Conflict = tuple[str, str, int, Protocol, NamespacedName]
EXTERNAL_IPS_FIELD = "spec.externalIPs"
INGRESS_FIELD = "status.loadBalancer.ingress"


def _held(ports: tuple[ServicePort, ...]) -> set[AddressKey]:
    return {(ip, sp.port, sp.protocol) for sp in ports for ip in sp.cluster_ips}


def _claimed(ports: tuple[ServicePort, ...]) -> set[AddressKey]:
    return {
        (ip, sp.port, sp.protocol)
        for sp in ports
        for ip in (*sp.external_ips, *sp.load_balancer_ips)
    }


class ClusterIPClaims:
    """The services as the converter gave them, indexed by the addresses they hold (ClusterIPs)
    and claim (externalIPs, ingress IPs)."""

    def __init__(self) -> None:
        self._given: dict[NamespacedName, tuple[ServicePort, ...]] = {}
        self._holders: dict[AddressKey, set[NamespacedName]] = {}
        self._claimers: dict[AddressKey, set[NamespacedName]] = {}
        self._warned: dict[NamespacedName, frozenset[Conflict]] = {}

    def record(self, key: NamespacedName, ports: tuple[ServicePort, ...]) -> list[NamespacedName]:
        """Record the service's ports (none: it is gone). Returns the services whose kept ports
        may have changed: this one, and those claiming a ClusterIP it took or let go."""
        old = self._given.pop(key, ())
        if ports:
            self._given[key] = ports
        old_held, new_held = _held(old), _held(ports)
        _reindex(self._holders, key, old_held, new_held)
        _reindex(self._claimers, key, _claimed(old), _claimed(ports))
        affected = {key}
        for address in old_held ^ new_held:
            affected |= self._claimers.get(address, set())
        return sorted(affected)

    def kept(self, key: NamespacedName) -> tuple[tuple[ServicePort, ...], list[InvalidObjectError]]:
        """The service's ports without claims on other services' ClusterIPs, and one warning for
        each such claim not already warned about."""
        conflicts: set[Conflict] = set()
        kept = tuple(self._kept_port(key, sp, conflicts) for sp in self._given.get(key, ()))
        before = self._warned.pop(key, frozenset())
        if conflicts:
            self._warned[key] = frozenset(conflicts)
        return kept, [_warning(key, c) for c in sorted(conflicts - before, key=str)]

    def _kept_port(
        self, key: NamespacedName, sp: ServicePort, conflicts: set[Conflict]
    ) -> ServicePort:
        external = self._free(key, sp, sp.external_ips, EXTERNAL_IPS_FIELD, conflicts)
        ingress = self._free(key, sp, sp.load_balancer_ips, INGRESS_FIELD, conflicts)
        if external == sp.external_ips and ingress == sp.load_balancer_ips:
            return sp
        return replace(sp, external_ips=external, load_balancer_ips=ingress)

    def _free(
        self,
        key: NamespacedName,
        sp: ServicePort,
        ips: tuple[str, ...],
        field: str,
        conflicts: set[Conflict],
    ) -> tuple[str, ...]:
        """`ips` without those another service holds as its ClusterIP on this port."""
        kept = []
        for ip in ips:
            holders = self._holders.get((ip, sp.port, sp.protocol), set()) - {key}
            if holders:
                conflicts.add((field, ip, sp.port, sp.protocol, min(holders)))
            else:
                kept.append(ip)
        return ips if len(kept) == len(ips) else tuple(kept)


def _reindex(
    index: dict[AddressKey, set[NamespacedName]],
    key: NamespacedName,
    old: set[AddressKey],
    new: set[AddressKey],
) -> None:
    for address in old - new:
        names = index[address]
        names.discard(key)
        if not names:
            del index[address]
    for address in new - old:
        index.setdefault(address, set()).add(key)


def _warning(key: NamespacedName, conflict: Conflict) -> InvalidObjectError:
    field, ip, port, protocol, holder = conflict
    return InvalidObjectError(
        f"Service {key}",
        field,
        f"{ip} is the ClusterIP of Service {holder} (port {port}/{protocol.value}); left out "
        "of that port, so the ClusterIP's own rules take its traffic",
    )
