"""PlanCache: one family's service-port parts from the last plan, in plan order, with the shared
chains' rules they add up to.

A plan that finds only a few ports changed replans those and splices their rules into the kept
lists; any other plan (the first, a new context, many changes) walks every port, reusing the
parts of ports that did not change. Changed ports are found by identity: the state hands
unchanged ports' objects and endpoint tuples from one snapshot to the next, and comparing ids is
far cheaper than hashing 10,000 ServicePortNames. So a one-service change costs one port's plan,
whatever the cluster's size, in each family (the IPv6 family of a cluster without IPv6 services
included). Neither path ever changes what plan_ruleset returns, only how fast it is made."""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import chain as chained
from itertools import islice
from operator import attrgetter
from typing import NamedTuple

from kproxy.model.endpoint import Endpoint
from kproxy.model.service import ServicePort, ServicePortName
from kproxy.plan.addresses import of_family
from kproxy.plan.iptables.naming import spn_sort_key
from kproxy.plan.iptables.service_rules import PlanContext, SharedChains, plan_service_port
from kproxy.rules.ir import Chain, Rule

PATCH_SHARE = 8  # patch when at most 1/8 of the ports changed (or a few in a small cluster)
PATCH_MIN = 64
# SharedChains' lists, in the order plan_ruleset lays them out.
LISTS = (
    "nat_services",
    "nat_nodeports",
    "filter_services",
    "filter_external",
    "filter_nodeports",
    "filter_firewall",
    "service_chains",
)
_GETTERS = tuple(attrgetter(name) for name in LISTS)

Endpoints = tuple[Endpoint, ...]
IdPairs = dict[int, ServicePortName]
SortKey = tuple[str, str, str, str]
ContextOf = Callable[[int], PlanContext]  # the context, given the family's endpoint count


def _id_pairs(entries: Iterable[tuple[ServicePortName, object]]) -> IdPairs:
    """Each entry as the ids of its name and of its value, in one int (ids are addresses, under
    2**64; one int weighs a third of a pair of them): any change of either shows."""
    return {id(spn) << 64 | id(value): spn for spn, value in entries}


class SeenMaps:
    """One plan input's maps as ids, made once for all its families' plans."""

    def __init__(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Endpoints],
    ) -> None:
        self.port_ids = _id_pairs(services.items())
        self.endpoint_ids = _id_pairs(endpoints.items())
        # The objects of those ids, alive while this is kept: the ids stay unique.
        self._held = (*services, *services.values(), *endpoints, *endpoints.values())
        # changed_since's last answer; the maps it was asked about are not kept alive by it.
        self._changed: tuple[weakref.ref[SeenMaps], set[ServicePortName]] | None = None

    def changed_since(self, last: SeenMaps) -> set[ServicePortName]:
        """The ports whose name, port or endpoints are not the very objects `last` held (worked
        out once, however many families ask)."""
        if self._changed is None or self._changed[0]() is not last:
            changed = _new_names(self.port_ids, last.port_ids)
            changed |= _new_names(self.endpoint_ids, last.endpoint_ids)
            self._changed = (weakref.ref(last), changed)
        return self._changed[1]


def _new_names(now: IdPairs, before: IdPairs) -> set[ServicePortName]:
    changed = {now[pair] for pair in now.keys() - before.keys()}
    changed.update(before[pair] for pair in before.keys() - now.keys())
    return changed


def _same(a: object, b: object) -> bool:
    return a is b or a == b


def family_endpoints(sp: ServicePort, endpoints: Endpoints, family: int) -> int:
    """The port's endpoints counted towards the large-cluster threshold: upstream runs one
    proxier per family, so only ports and endpoints of this family count."""
    if not of_family(sp.cluster_ips, family):
        return 0
    return sum(1 for ep in endpoints if ep.family == family)


@dataclass(frozen=True, slots=True)
class _Part:
    """One port's rules, as SharedChains holds them but in tuples: a row keeps them until its
    port changes. Most of a port's lists are empty (an IPv4 port's in the IPv6 family, all of
    them), and an empty tuple costs nothing: 10,000 ports' seven lists each weighed 12 MB."""

    nat_services: tuple[Rule, ...]
    nat_nodeports: tuple[Rule, ...]
    filter_services: tuple[Rule, ...]
    filter_external: tuple[Rule, ...]
    filter_nodeports: tuple[Rule, ...]
    filter_firewall: tuple[Rule, ...]
    service_chains: tuple[Chain, ...]
    no_local_internal: int
    no_local_external: int


_NO_RULES = _Part((), (), (), (), (), (), (), 0, 0)  # shared by every port with no rules here


def _plan_part(ctx: PlanContext, sp: ServicePort, eps: Endpoints) -> _Part:
    planned = SharedChains()
    plan_service_port(ctx, sp, eps, planned)
    if not (
        planned.nat_services
        or planned.service_chains
        or planned.nat_nodeports
        or planned.filter_services
        or planned.filter_external
        or planned.filter_nodeports
        or planned.filter_firewall
        or planned.no_local_internal
        or planned.no_local_external
    ):
        return _NO_RULES
    return _Part(
        tuple(planned.nat_services),
        tuple(planned.nat_nodeports),
        tuple(planned.filter_services),
        tuple(planned.filter_external),
        tuple(planned.filter_nodeports),
        tuple(planned.filter_firewall),
        tuple(planned.service_chains),
        planned.no_local_internal,
        planned.no_local_external,
    )


class _Row(NamedTuple):
    """One port as the last plan saw it."""

    name: ServicePortName
    port: ServicePort
    endpoints: Endpoints
    part: _Part
    endpoint_count: int  # its family_endpoints
    chain_rules: int  # the rules of its own chains (part.service_chains)


_PART = attrgetter("part")


def _row(spn: ServicePortName, sp: ServicePort, eps: Endpoints, part: _Part, family: int) -> _Row:
    chain_rules = sum(len(chain.rules) for chain in part.service_chains)
    return _Row(spn, sp, eps, part, family_endpoints(sp, eps, family), chain_rules)


class PlanCache:
    """Each service port's rules from the previous plan of one family, and their sum."""

    def __init__(self) -> None:
        self.context: PlanContext | None = None
        self._keys: list[SortKey] = []  # each row's spn_sort_key: the rows' order
        self._rows: list[_Row] = []
        self._out = SharedChains()  # the rows' parts' lists, each flattened in row order
        self._seen: SeenMaps | None = None  # the last plan's input
        self.service_chain_rules = 0  # the rows' chain_rules, summed
        self._count = 0  # the rows' counts, summed (the context's large_cluster depends on it)

    def plan(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Endpoints],
        family: int,
        context_of: ContextOf,
        seen: SeenMaps | None = None,
    ) -> SharedChains:
        """Every port's rules, in plan order, summed into the shared chains (read-only: the
        lists are the cache's). `seen`: SeenMaps of these maps, if already made."""
        seen = seen if seen is not None else SeenMaps(services, endpoints)
        last, self._seen = self._seen, None  # until the rows match `seen` again
        try:
            patched = False
            if self.context is not None and last is not None:
                changed = seen.changed_since(last)
                if len(changed) <= max(PATCH_MIN, len(self._rows) // PATCH_SHARE):
                    patched = self._patch(services, endpoints, family, context_of, changed)
            if not patched:
                self._rebuild(services, endpoints, family, context_of)
        except BaseException:
            self.context = None  # half-way: the next plan starts afresh
            raise
        self._seen = seen
        return self._out

    def _find(self, spn: ServicePortName) -> tuple[int, bool]:
        key = spn_sort_key(spn)
        i = bisect_left(self._keys, key)
        return i, i < len(self._keys) and self._keys[i] == key

    def _patch(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Endpoints],
        family: int,
        context_of: ContextOf,
        changed: set[ServicePortName],
    ) -> bool:
        """Replan the changed ports in place; False (nothing done) when the context moved."""
        count = self._count
        for spn in changed:
            i, present = self._find(spn)
            if present:
                count -= self._rows[i].endpoint_count
            sp = services.get(spn)
            if sp is not None:
                count += family_endpoints(sp, endpoints.get(spn, ()), family)
        if context_of(count) != self.context:
            return False
        self._count = count
        for spn in sorted(changed, key=spn_sort_key):
            self._patch_port(spn, services.get(spn), endpoints.get(spn, ()), family)
        return True

    def _patch_port(
        self, spn: ServicePortName, sp: ServicePort | None, eps: Endpoints, family: int
    ) -> None:
        i, present = self._find(spn)
        old = self._rows[i] if present else None
        if sp is None:
            if old is not None:
                self._splice(i, old.part, None)
                self.service_chain_rules -= old.chain_rules
                del self._rows[i], self._keys[i]
            return
        if old is not None and _same(old.port, sp) and _same(old.endpoints, eps):
            self._rows[i] = old._replace(port=sp, endpoints=eps)  # equal: the same part
            return
        assert self.context is not None  # a plan was made: only then is there a patch
        part = _plan_part(self.context, sp, eps)
        self._splice(i, old.part if old is not None else None, part)
        row = _row(spn, sp, eps, part, family)
        self.service_chain_rules += row.chain_rules - (old.chain_rules if old else 0)
        if old is not None:
            self._rows[i] = row
        else:
            self._rows.insert(i, row)
            self._keys.insert(i, spn_sort_key(spn))

    def _splice(self, i: int, old: _Part | None, new: _Part | None) -> None:
        """Put port i's new rules where its old ones were in each flat list."""
        out = self._out
        for of in _GETTERS:
            before = of(old) if old is not None else ()
            after = of(new) if new is not None else ()
            if before or after:
                start = sum(map(len, map(of, map(_PART, islice(self._rows, i)))))
                of(out)[start : start + len(before)] = after
        if old is not None:
            out.no_local_internal -= old.no_local_internal
            out.no_local_external -= old.no_local_external
        if new is not None:
            out.no_local_internal += new.no_local_internal
            out.no_local_external += new.no_local_external

    def _rebuild(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Endpoints],
        family: int,
        context_of: ContextOf,
    ) -> None:
        """Every port, reusing the part of a port whose objects are equal to the last plan's
        (under the same context)."""
        count = sum(
            family_endpoints(sp, endpoints.get(spn, ()), family) for spn, sp in services.items()
        )
        ctx = context_of(count)
        old = {row.name: row for row in self._rows} if ctx == self.context else {}
        self.context = ctx
        self._count = count
        self._keys, self._rows = [], []
        for spn in sorted(services, key=spn_sort_key):
            sp, eps = services[spn], endpoints.get(spn, ())
            hit = old.get(spn)
            if hit is not None and _same(hit.port, sp) and _same(hit.endpoints, eps):
                part = hit.part
            else:
                part = _plan_part(ctx, sp, eps)
            self._keys.append(spn_sort_key(spn))
            self._rows.append(_row(spn, sp, eps, part, family))
        self.service_chain_rules = sum(row.chain_rules for row in self._rows)
        parts = [row.part for row in self._rows]
        out = SharedChains()
        for name, of in zip(LISTS, _GETTERS, strict=True):
            setattr(out, name, list(chained.from_iterable(map(of, parts))))
        out.no_local_internal = sum(p.no_local_internal for p in parts)
        out.no_local_external = sum(p.no_local_external for p in parts)
        self._out = out
