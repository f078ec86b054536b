"""The current Services and EndpointSlices, and which services changed since the last sync."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from kproxy.model.convert import EndpointSliceInfo
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, ServicePort, ServicePortName

ServicesMap = dict[ServicePortName, ServicePort]
EndpointsMap = dict[ServicePortName, tuple[Endpoint, ...]]


class ClusterState:
    """Holds what the sources reported; every update records the service it touches, so a sync can
    tell which services' chains need rewriting."""

    def __init__(self) -> None:
        self._services: dict[NamespacedName, tuple[ServicePort, ...]] = {}
        self._slices: dict[NamespacedName, EndpointSliceInfo] = {}
        self.node: NodeInfo | None = None
        self._changed: set[NamespacedName] = set()
        self._trigger_times: list[float] = []
        # Per service: its slices, and its endpoints map computed from them (dropped on change),
        # so that a sync touching one service does not rebuild every other service's endpoints.
        self._slices_of: dict[NamespacedName, set[NamespacedName]] = {}
        self._endpoints_of: dict[NamespacedName, EndpointsMap] = {}
        # The two maps as last built, until the next change: a sync with nothing changed (the
        # periodic one) then costs no copy of 10,000 services. Callers must not modify them.
        self._services_map: ServicesMap | None = None
        self._endpoints_map: EndpointsMap | None = None

    def set_service(self, key: NamespacedName, ports: Iterable[ServicePort]) -> None:
        ports = tuple(ports)
        if self._services.get(key) != ports:
            self._services[key] = ports
            self._mark(key)

    def delete_service(self, key: NamespacedName) -> None:
        if self._services.pop(key, None) is not None:
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
        self._services_map = self._endpoints_map = None

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
        if self._services_map is None:
            self._services_map = {sp.name: sp for ports in self._services.values() for sp in ports}
        return self._services_map

    def endpoints_map(self) -> EndpointsMap:
        """Endpoints of every service port; unchanged services keep the same tuples from one
        call to the next."""
        if self._endpoints_map is not None:
            return self._endpoints_map
        merged: EndpointsMap = {}
        for service, keys in self._slices_of.items():
            cached = self._endpoints_of.get(service)
            if cached is None:
                cached = build_endpoints_map(self._slices[k] for k in keys)
                self._endpoints_of[service] = cached
            merged.update(cached)
        self._endpoints_map = merged
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
                ep = replace(ep, port=port.port)
                seen = bucket.get((ep.ip, ep.port))
                if seen is None or (seen.terminating and not ep.terminating):
                    bucket[(ep.ip, ep.port)] = ep
    return {
        spn: tuple(sorted(bucket.values(), key=str)) for spn, bucket in merged.items() if bucket
    }
