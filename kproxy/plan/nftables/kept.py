"""NftPlanCache: the last plan's service-port parts in table order, with the elements they claim.

A plan that finds only a few ports changed patches these and the table built from them, and
records in the table's `changes` what it touched, so that the dataplane need not compare the
whole table. Changed ports are found by identity: the state hands unchanged ports' objects and
endpoint tuples from one snapshot to the next, and comparing ids is far cheaper than hashing
10,000 ServicePortNames. Any other plan (the first, a new context, many changes) rebuilds the
parts in full, reusing those of ports whose objects did not change. Neither path ever changes
what the plan returns, only how fast it is made."""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import chain as chained
from itertools import islice
from operator import attrgetter

from kproxy.model.endpoint import Endpoint
from kproxy.model.service import ServicePort, ServicePortName
from kproxy.plan.nftables.claims import ElementClaims, ElementKey, Order
from kproxy.plan.nftables.ir import Chain, Element, NamedSet, NftTable, TableChanges
from kproxy.plan.nftables.service_port import NftContext, PortPart, plan_port_part

FRAME_ORDER: Order = ()  # the frame's own elements come before every port's
PATCH_SHARE = 8  # patch when at most 1/8 of the ports changed (or a few in a small table)
PATCH_MIN = 64
SPLICE_MAX = 16  # splice the changed ports' chains into the flat lists up to this many ports
_CHAINS = attrgetter("chains")
_SETS = attrgetter("sets")

Endpoints = tuple[Endpoint, ...]
IdPairs = dict[tuple[int, int], ServicePortName]


@dataclass(frozen=True)
class TableFrame:
    """The table besides its ports' parts, and what every part depends on."""

    family: int
    name: str
    comment: str | None
    ctx: NftContext
    chains: tuple[Chain, ...]  # the base and shared chains, first in the table
    sets: tuple[NamedSet, ...]  # the maps, first among the sets
    elements: tuple[tuple[str, Element], ...]  # the frame's own (the NodePort addresses)


@dataclass(frozen=True)
class TablePlan:
    table: NftTable
    no_local_internal: int = 0
    no_local_external: int = 0
    rules: int = 0


def port_order(spn: ServicePortName) -> Order:
    """Namespace, name, port, protocol: the iptables mode's order (read off the fields, which
    is cheaper than its cached key's lookup)."""
    return (spn.service.namespace, spn.service.name, spn.port, spn.protocol.value)


def _id_pairs(entries: Iterable[tuple[ServicePortName, object]]) -> IdPairs:
    """Each entry as (id of its name, id of its value): any change of either shows."""
    return {(id(spn), id(value)): spn for spn, value in entries}


def _new_names(now: IdPairs, before: IdPairs) -> set[ServicePortName]:
    changed = {now[pair] for pair in now.keys() - before.keys()}
    changed.update(before[pair] for pair in before.keys() - now.keys())
    return changed


@dataclass
class _Patch:
    """What one patch touched, for the table's `changes`."""

    new_chains: list[Chain]
    old_chains: list[Chain]
    new_sets: list[NamedSet]
    old_sets: list[NamedSet]
    # Per set or map, each touched key's element before the patch (None: it had none).
    before: dict[str, dict[ElementKey, Element | None]]


class NftPlanCache:
    def __init__(self) -> None:
        self._frame: TableFrame | None = None
        # Parallel lists, in table order: each port's place, objects and part.
        self._order: list[Order] = []
        self._ports: list[ServicePort] = []
        self._endpoints: list[Endpoints] = []
        self._parts: list[PortPart] = []
        # All parts' chains and sets, in table order, as the table holds them after the frame's.
        self._chains: list[Chain] = []
        self._sets: list[NamedSet] = []
        self._claims: dict[str, ElementClaims] = {}
        self._elements: dict[str, frozenset[Element]] = {}
        self._port_ids: IdPairs = {}
        self._endpoint_ids: IdPairs = {}
        self._held: tuple[object, ...] = ()  # the objects of those ids, alive: ids stay unique
        self._totals = [0, 0, 0]  # the parts' no_local_internal, no_local_external, rules
        self._last: weakref.ref[NftTable] | None = None

    def plan(
        self,
        frame: TableFrame,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Endpoints],
    ) -> TablePlan:
        port_ids = _id_pairs(services.items())
        endpoint_ids = _id_pairs(endpoints.items())
        changes = None
        if frame == self._frame:
            changed = _new_names(port_ids, self._port_ids)
            changed |= _new_names(endpoint_ids, self._endpoint_ids)
            if len(changed) <= max(PATCH_MIN, len(self._order) // PATCH_SHARE):
                changes = self._patch(services, endpoints, changed)
        if changes is None:
            self._rebuild(frame, services, endpoints)
        self._frame = frame
        self._port_ids, self._endpoint_ids = port_ids, endpoint_ids
        self._held = (*services, *services.values(), *endpoints, *endpoints.values())
        table = NftTable(
            family=frame.family,
            name=frame.name,
            comment=frame.comment,
            sets=(*frame.sets, *self._sets),
            elements={name: e for name, e in self._elements.items() if e},
            chains=(*frame.chains, *self._chains),
            changes=changes,
        )
        self._last = weakref.ref(table)
        frame_rules = sum(len(c.rules) for c in frame.chains)
        internal, external, rules = self._totals
        return TablePlan(table, internal, external, rules + frame_rules)

    def _rebuild(
        self,
        frame: TableFrame,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Endpoints],
    ) -> None:
        reusable = frame == self._frame
        old_ports, old_endpoints, old_parts = self._ports, self._endpoints, self._parts
        old = {id(sp): i for i, sp in enumerate(old_ports)} if reusable else {}
        ranked = sorted((port_order(spn), spn, sp) for spn, sp in services.items())
        self._order, self._ports, self._endpoints, self._parts = [], [], [], []
        self._totals = [0, 0, 0]
        for order, spn, sp in ranked:
            eps = endpoints.get(spn, ())
            i = old.get(id(sp))
            if i is not None and old_ports[i] is sp and (_same(old_endpoints[i], eps)):
                part = old_parts[i]
            else:
                part = plan_port_part(frame.ctx, sp, eps)
            self._order.append(order)
            self._ports.append(sp)
            self._endpoints.append(eps)
            self._parts.append(part)
            self._count(part, 1)
        self._claims = {s.name: ElementClaims() for s in frame.sets}
        for name, element in frame.elements:
            self._claims_of(name).claim(FRAME_ORDER, element)
        for order, part in zip(self._order, self._parts, strict=True):
            for name, element in part.elements:
                self._claims_of(name).claim(order, element)
        self._elements = {name: frozenset(c.held.values()) for name, c in self._claims.items()}
        self._flatten()

    def _flatten(self) -> None:
        self._chains = list(chained.from_iterable(map(_CHAINS, self._parts)))
        self._sets = list(chained.from_iterable(map(_SETS, self._parts)))

    def _splice(self, i: int, old: PortPart | None, new: PortPart | None) -> None:
        """Put port i's new chains and sets where its old ones were in the flat lists."""
        for flat, of in ((self._chains, _CHAINS), (self._sets, _SETS)):
            start = sum(map(len, map(of, islice(self._parts, i))))
            flat[start : start + (len(of(old)) if old else 0)] = of(new) if new else ()

    def _patch(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Endpoints],
        changed: set[ServicePortName],
    ) -> TableChanges:
        """Replan the changed ports in place; what that touched, relative to the last table."""
        assert self._frame is not None and self._last is not None  # a plan with this frame was made
        ctx = self._frame.ctx
        patch = _Patch([], [], [], [], {})
        splice = len(changed) <= SPLICE_MAX
        for spn in sorted(changed, key=port_order):
            order = port_order(spn)
            i = bisect_left(self._order, order)
            present = i < len(self._order) and self._order[i] == order
            old = self._parts[i] if present else None
            sp = services.get(spn)
            eps = endpoints.get(spn, ())
            part: PortPart | None = None
            if sp is None:
                if not present:
                    continue
                if splice:
                    self._splice(i, old, None)
                del self._order[i], self._ports[i], self._endpoints[i], self._parts[i]
            elif present and self._ports[i] is sp and _same(self._endpoints[i], eps):
                self._endpoints[i] = eps  # equal endpoints in a new tuple: the same part
                continue
            else:
                part = plan_port_part(ctx, sp, eps)
                if splice:
                    self._splice(i, old, part)
                if present:
                    self._ports[i], self._endpoints[i], self._parts[i] = sp, eps, part
                else:
                    self._order.insert(i, order)
                    self._ports.insert(i, sp)
                    self._endpoints.insert(i, eps)
                    self._parts.insert(i, part)
            if old is not None:
                self._leave(order, old, patch)
            if part is not None:
                self._join(order, part, patch)
        if not splice:
            self._flatten()
        touched = self._settle_elements(patch.before)
        new_chains = {c.name for c in patch.new_chains}
        new_sets = {s.name for s in patch.new_sets}
        return TableChanges(
            base=self._last,
            chains=tuple(patch.new_chains),
            dropped_chains=tuple(c.name for c in patch.old_chains if c.name not in new_chains),
            sets=tuple(patch.new_sets),
            dropped_sets=tuple(s.name for s in patch.old_sets if s.name not in new_sets),
            elements=touched,
        )

    def _leave(self, order: Order, part: PortPart, patch: _Patch) -> None:
        self._count(part, -1)
        patch.old_chains.extend(part.chains)
        patch.old_sets.extend(part.sets)
        for name, element in part.elements:
            claims = self._claims_of(name)
            _note(patch.before, name, element.key, claims)
            claims.release(order, element.key)

    def _join(self, order: Order, part: PortPart, patch: _Patch) -> None:
        self._count(part, 1)
        patch.new_chains.extend(part.chains)
        patch.new_sets.extend(part.sets)
        for name, element in part.elements:
            claims = self._claims_of(name)
            _note(patch.before, name, element.key, claims)
            claims.claim(order, element)

    def _settle_elements(
        self, before: dict[str, dict[ElementKey, Element | None]]
    ) -> tuple[str, ...]:
        """Patch each touched set's elements with the keys whose winner changed; their names."""
        touched = []
        for name, was in before.items():
            held = self._claims[name].held
            gone = [e for key, e in was.items() if e is not None and held.get(key) != e]
            came = [e for key in was if (e := held.get(key)) is not None and e != was[key]]
            if gone or came:
                touched.append(name)
                elements = self._elements.get(name, frozenset())
                self._elements[name] = elements.difference(gone).union(came)
        return tuple(touched)

    def _claims_of(self, name: str) -> ElementClaims:
        claims = self._claims.get(name)
        if claims is None:
            claims = self._claims[name] = ElementClaims()
        return claims

    def _count(self, part: PortPart, sign: int) -> None:
        totals = self._totals
        totals[0] += sign * part.no_local_internal
        totals[1] += sign * part.no_local_external
        totals[2] += sign * part.rules


def _note(
    before: dict[str, dict[ElementKey, Element | None]],
    name: str,
    key: ElementKey,
    claims: ElementClaims,
) -> None:
    """Remember the key's element as it was before the patch's first touch."""
    was = before.setdefault(name, {})
    if key not in was:
        was[key] = claims.held.get(key)


def _same(kept: Endpoints, now: Endpoints) -> bool:
    return kept is now or kept == now
