"""The current Services and EndpointSlices, and which services changed since the last sync."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from ipaddress import ip_network
from typing import TypeVar

from kproxy.errors import InvalidObjectError
from kproxy.model.addresses import AllowList
from kproxy.model.convert import EndpointSliceInfo
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, ServicePort, ServicePortName
from kproxy.state.claims import ClusterIPClaims

ServicesMap = dict[ServicePortName, ServicePort]
EndpointsMap = dict[ServicePortName, tuple[Endpoint, ...]]
T = TypeVar("T")


class ClusterState:
    """Holds what the sources reported; every update records the service it touches, so a sync can
    tell which services' chains need rewriting."""

    def __init__(self) -> None:
        self._services: dict[NamespacedName, tuple[ServicePort, ...]] = {}
        self._slices: dict[NamespacedName, EndpointSliceInfo] = {}
        self._node: NodeInfo | None = None
        # ServiceCIDR objects by name: their CIDRs.
        self._service_cidrs: dict[str, tuple[str, ...]] = {}
        # The config's allowedExternalIPCIDRs (None: any address); set before any Service.
        self.allowed_vips: AllowList = None
        self._claims = ClusterIPClaims()
        self._changed: set[NamespacedName] = set()
        self._trigger_times: list[float] = []
        # Per service: its slices, and its endpoints map computed from them (dropped on change),
        # so that a sync touching one service does not rebuild every other service's endpoints.
        self._slices_of: dict[NamespacedName, set[NamespacedName]] = {}
        self._endpoints_of: dict[NamespacedName, EndpointsMap] = {}
        # The two maps as last built, and the services changed since: a sync with nothing changed
        # (the periodic one) reuses them, and one after a change copies them and redoes only the
        # changed services. Callers must not modify them.
        self._services_map: ServicesMap | None = None
        self._endpoints_map: EndpointsMap | None = None
        self._map_keys: dict[str, dict[NamespacedName, tuple[ServicePortName, ...]]] = {
            "services": {},
            "endpoints": {},
        }
        self._dirty: dict[str, set[NamespacedName]] = {"services": set(), "endpoints": set()}

    @property
    def node(self) -> NodeInfo | None:
        """The Node as last reported, with the cluster's ServiceCIDRs."""
        node = self._node
        if node is None:
            return None
        cidrs = self.service_cidrs()
        return node if node.service_cidrs == cidrs else replace(node, service_cidrs=cidrs)

    @node.setter
    def node(self, node: NodeInfo | None) -> None:
        self._node = node

    def set_service_cidr(self, name: str, cidrs: tuple[str, ...]) -> None:
        if cidrs:
            self._service_cidrs[name] = cidrs
        else:
            self._service_cidrs.pop(name, None)

    def delete_service_cidr(self, name: str) -> None:
        self._service_cidrs.pop(name, None)

    def service_cidr_names(self) -> set[str]:
        return set(self._service_cidrs)

    def service_cidrs(self) -> tuple[str, ...]:
        """Every ServiceCIDR's ranges, once each, sorted (the plan must not depend on the
        order the objects arrived in)."""
        every = {cidr for cidrs in self._service_cidrs.values() for cidr in cidrs}
        return tuple(sorted(every, key=lambda c: (":" in c, ip_network(c))))

    def set_service(
        self, key: NamespacedName, ports: Iterable[ServicePort]
    ) -> list[InvalidObjectError]:
        """Returns one warning per claim newly left out (see ClusterIPClaims), of this service
        or of another one claiming a ClusterIP this one now holds."""
        warnings = []
        for service in self._claims.record(key, tuple(ports)):
            kept, new = self._claims.kept(service)
            warnings += new
            self._keep(service, kept)
        return warnings

    def delete_service(self, key: NamespacedName) -> None:
        """Services that claimed its ClusterIPs get them back (without a warning)."""
        self.set_service(key, ())

    def _keep(self, key: NamespacedName, ports: tuple[ServicePort, ...]) -> None:
        if not ports:
            if self._services.pop(key, None) is not None:
                self._mark(key)
        elif self._services.get(key) != ports:
            self._services[key] = ports
            self._mark(key)

    def set_slice(self, info: EndpointSliceInfo) -> None:
        old = self._slices.get(info.key)
        if old != info:
            if old is not None:
                self._forget_slice(old)
            self._slices[info.key] = info
            self._slices_of.setdefault(info.service, set()).add(info.key)
            self._endpoints_of.pop(info.service, None)
            self._mark(info.service)
            if info.trigger_time is not None:
                self._trigger_times.append(info.trigger_time)

    def delete_slice(self, key: NamespacedName) -> None:
        old = self._slices.pop(key, None)
        if old is not None:
            self._forget_slice(old)

    def _forget_slice(self, old: EndpointSliceInfo) -> None:
        keys = self._slices_of.get(old.service)
        if keys is not None:
            keys.discard(old.key)
            if not keys:
                del self._slices_of[old.service]
        self._endpoints_of.pop(old.service, None)
        self._mark(old.service)

    def _mark(self, service: NamespacedName) -> None:
        self._changed.add(service)
        for dirty in self._dirty.values():
            dirty.add(service)

    def take_changes(self) -> set[NamespacedName]:
        """The services changed since the previous call."""
        changed, self._changed = self._changed, set()
        return changed

    def restore_changes(self, changed: set[NamespacedName]) -> None:
        """Put back changes taken by a sync that then failed."""
        self._changed |= changed

    def take_trigger_times(self) -> list[float]:
        """When the endpoint changes applied since the previous call happened, where known."""
        times, self._trigger_times = self._trigger_times, []
        return times

    def service_keys(self) -> set[NamespacedName]:
        return set(self._services)

    def slice_keys(self) -> set[NamespacedName]:
        return set(self._slices)

    def services_map(self) -> ServicesMap:
        self._services_map = self._updated(
            "services",
            self._services_map,
            self._services,
            lambda svc: {sp.name: sp for sp in self._services.get(svc, ())},
        )
        return self._services_map

    def endpoints_map(self) -> EndpointsMap:
        """Endpoints of every service port; unchanged services keep the same tuples from one
        call to the next."""
        self._endpoints_map = self._updated(
            "endpoints", self._endpoints_map, self._slices_of, self._endpoints_of_service
        )
        return self._endpoints_map

    def _endpoints_of_service(self, service: NamespacedName) -> EndpointsMap:
        cached = self._endpoints_of.get(service)
        if cached is None:
            keys = self._slices_of.get(service, set())
            cached = build_endpoints_map(self._slices[k] for k in keys)
            self._endpoints_of[service] = cached
        return cached

    def _updated(
        self,
        name: str,
        previous: dict[ServicePortName, T] | None,
        services: Iterable[NamespacedName],
        entries_of: Callable[[NamespacedName], dict[ServicePortName, T]],
    ) -> dict[ServicePortName, T]:
        """One of the two maps: as it was when nothing changed, rebuilt in full the first time,
        else copied with only the changed services' entries redone."""
        keys, dirty = self._map_keys[name], self._dirty[name]
        if previous is not None and not dirty:
            return previous
        if previous is None:
            merged: dict[ServicePortName, T] = {}
            keys.clear()
            todo: Iterable[NamespacedName] = list(services)
        else:
            merged = dict(previous)
            todo = sorted(dirty, key=str)
            for service in todo:
                for spn in keys.pop(service, ()):
                    del merged[spn]
        for service in todo:
            entries = entries_of(service)
            if entries:
                merged.update(entries)
                keys[service] = tuple(entries)
        dirty.clear()
        return merged


def build_endpoints_map(slices: Iterable[EndpointSliceInfo]) -> EndpointsMap:
    """Endpoints per service port over all slices of each service, sorted as upstream sorts them
    (by `ip:port` string). An address:port in several slices keeps its non-terminating copy."""
    merged: dict[ServicePortName, dict[tuple[str, int], Endpoint]] = {}
    for sl in sorted(slices, key=lambda s: (s.key.namespace, s.key.name)):
        for port in sl.ports:
            spn = ServicePortName(sl.service, port.name, port.protocol)
            bucket = merged.setdefault(spn, {})
            for ep in sl.endpoints:
                ep = ep.at_port(port.port)
                seen = bucket.get((ep.ip, ep.port))
                if seen is None or (seen.terminating and not ep.terminating):
                    bucket[(ep.ip, ep.port)] = ep
    return {
        spn: tuple(sorted(bucket.values(), key=str)) for spn, bucket in merged.items() if bucket
    }
