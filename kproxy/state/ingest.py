"""Feeding Kubernetes objects into ClusterState. Shared by the file source and the API watch.

Each function converts one object; an invalid object raises InvalidObjectError (naming object and
field) after removing whatever the state held for it, so the rest of the cluster is unaffected.
That holds for any exception the converter raises: one object the converter cannot handle must
never stop a source from delivering the others."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from kproxy.errors import InvalidObjectError
from kproxy.model.convert import (
    build_endpoint_slice,
    build_node,
    build_service,
)
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName
from kproxy.model.service_cidr import build_service_cidr
from kproxy.state.cluster import ClusterState

T = TypeVar("T")


def object_key(obj: Mapping[str, Any]) -> NamespacedName:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}  # a malformed object keys as "default/"
    return NamespacedName(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def _convert(kind: Kind, build: Callable[[Mapping[str, Any]], T], obj: Mapping[str, Any]) -> T:
    try:
        return build(obj)
    except InvalidObjectError:
        raise
    except Exception as exc:  # a converter bug costs this one object, never the source
        key = object_key(obj)
        raise InvalidObjectError(
            f"{kind} {key.namespace}/{key.name}",
            "(object)",
            f"could not be converted ({type(exc).__name__}: {exc}); skipped",
        ) from exc


def update_service(state: ClusterState, obj: Mapping[str, Any]) -> list[InvalidObjectError]:
    """Returns the values left out of the service's ports (a bad externalIP, source range or
    load-balancer ingress, an address outside the config's allow-list, another service's
    ClusterIP claimed), one error each."""
    key = object_key(obj)
    try:
        info = _convert(Kind.SERVICE, lambda o: build_service(o, state.allowed_vips), obj)
    except InvalidObjectError:
        state.delete_service(key)
        raise
    return [*info.skipped, *state.set_service(key, info.ports)]


def update_endpoint_slice(state: ClusterState, obj: Mapping[str, Any]) -> list[InvalidObjectError]:
    """Returns the slice's skipped endpoints, one error each."""
    key = object_key(obj)
    try:
        info = _convert(Kind.ENDPOINT_SLICE, build_endpoint_slice, obj)
    except InvalidObjectError:
        state.delete_slice(key)
        raise
    if info is None:
        state.delete_slice(key)
        return []
    state.set_slice(info)
    return list(info.skipped)


def node_for(name: str, objects: list[dict[str, Any]]) -> NodeInfo:
    """The Node named `name` among `objects`, or a bare NodeInfo when it is not there."""
    for obj in objects:
        if object_key(obj).name == name:
            return _convert(Kind.NODE, build_node, obj)
    return NodeInfo(name=name)


Change = Callable[[ClusterState], list[InvalidObjectError]]


@dataclass(frozen=True)
class KindChange:
    """A change to objects of one kind; it returns the objects it skipped."""

    kind: Kind
    change: Change


@dataclass(frozen=True)
class Mutation:
    """A change to the cluster state, made of changes to one kind each, applied together so no
    sync sees half of it. A sink counts each part's skipped objects under that part's kind."""

    parts: tuple[KindChange, ...]

    @property
    def kinds(self) -> frozenset[Kind]:
        return frozenset(part.kind for part in self.parts)

    def apply_to(self, state: ClusterState) -> list[tuple[Kind, InvalidObjectError]]:
        """Apply every part; returns each skipped object with its kind."""
        return [(part.kind, exc) for part in self.parts for exc in part.change(state)]

    def __call__(self, state: ClusterState) -> list[InvalidObjectError]:
        return [exc for _, exc in self.apply_to(state)]


@dataclass(frozen=True)
class _KeyedKind:
    """How objects of a kind the state keeps by namespace/name enter and leave it."""

    kind: Kind
    update: Callable[[ClusterState, Mapping[str, Any]], list[InvalidObjectError]]
    delete: Callable[[ClusterState, NamespacedName], None]
    keys: Callable[[ClusterState], set[NamespacedName]]


_KEYED = {
    Kind.SERVICE: _KeyedKind(
        Kind.SERVICE, update_service, ClusterState.delete_service, ClusterState.service_keys
    ),
    Kind.ENDPOINT_SLICE: _KeyedKind(
        Kind.ENDPOINT_SLICE,
        update_endpoint_slice,
        ClusterState.delete_slice,
        ClusterState.slice_keys,
    ),
}
KeyedKind = Literal[Kind.SERVICE, Kind.ENDPOINT_SLICE]
KEYED_KINDS: tuple[KeyedKind, ...] = (Kind.SERVICE, Kind.ENDPOINT_SLICE)


def _keyed(kind: KeyedKind) -> _KeyedKind:
    """Refuses a Node (the state holds one, set whole by set_node) and anything not a Kind; a
    caller without types may pass the kind's string."""
    try:
        return _KEYED[Kind(kind)]
    except (KeyError, ValueError):
        raise ValueError(
            f"{kind!r} is not Service or EndpointSlice; a Node is set with set_node"
        ) from None


def _each(objs: Iterable[Mapping[str, Any]], keyed: _KeyedKind) -> Change:
    def change(state: ClusterState) -> list[InvalidObjectError]:
        errors = []
        for obj in objs:
            try:
                errors.extend(keyed.update(state, obj))
            except InvalidObjectError as exc:
                errors.append(exc)
        return errors

    return change


def _one(kind: Kind, change: Change) -> Mutation:
    return Mutation((KindChange(kind, change),))


def upsert(kind: KeyedKind, obj: Mapping[str, Any]) -> Mutation:
    """Add or update one Service or EndpointSlice."""
    keyed = _keyed(kind)
    return _one(keyed.kind, _each([obj], keyed))


def remove(kind: KeyedKind, obj: Mapping[str, Any]) -> Mutation:
    keyed = _keyed(kind)
    key = object_key(obj)

    def change(state: ClusterState) -> list[InvalidObjectError]:
        keyed.delete(state, key)
        return []

    return _one(keyed.kind, change)


def replace_all(kind: KeyedKind, objs: Sequence[Mapping[str, Any]]) -> Mutation:
    """Make the state hold exactly these Services (or EndpointSlices): a (re)list."""
    keyed = _keyed(kind)
    keys = {object_key(o) for o in objs}
    apply_each = _each(objs, keyed)

    def change(state: ClusterState) -> list[InvalidObjectError]:
        for key in keyed.keys(state) - keys:
            keyed.delete(state, key)
        return apply_each(state)

    return _one(keyed.kind, change)


def set_objects(
    kind: KeyedKind, objects: Mapping[NamespacedName, Mapping[str, Any] | None]
) -> Mutation:
    """Set these Services (or EndpointSlices) to these objects and remove those mapped to None;
    every other object stays as it is. A change to one manifest file is one of these per kind."""
    keyed = _keyed(kind)
    present = [obj for obj in objects.values() if obj is not None]
    gone = [key for key, obj in objects.items() if obj is None]
    apply_each = _each(present, keyed)

    def change(state: ClusterState) -> list[InvalidObjectError]:
        for key in gone:
            keyed.delete(state, key)
        return apply_each(state)

    return _one(keyed.kind, change)


def set_node(name: str, objs: Sequence[Mapping[str, Any]]) -> Mutation:
    """The state's Node becomes the object named `name` among `objs` (or a bare one)."""

    def change(state: ClusterState) -> list[InvalidObjectError]:
        try:
            state.node = node_for(name, [dict(o) for o in objs])
        except InvalidObjectError as exc:
            state.node = NodeInfo(name=name)
            return [exc]
        return list(state.node.skipped)

    return _one(Kind.NODE, change)


def _update_service_cidr(state: ClusterState, obj: Mapping[str, Any]) -> list[InvalidObjectError]:
    name = object_key(obj).name
    try:
        info = _convert(Kind.SERVICE_CIDR, build_service_cidr, obj)
    except InvalidObjectError as exc:
        state.delete_service_cidr(name)
        return [exc]
    state.set_service_cidr(info.name, info.cidrs)
    return list(info.skipped)


def set_service_cidrs(objs: Sequence[Mapping[str, Any]]) -> Mutation:
    """The state's ServiceCIDRs become exactly these (a list, or a relist)."""

    def change(state: ClusterState) -> list[InvalidObjectError]:
        names = {object_key(o).name for o in objs}
        for name in state.service_cidr_names() - names:
            state.delete_service_cidr(name)
        return [exc for obj in objs for exc in _update_service_cidr(state, obj)]

    return _one(Kind.SERVICE_CIDR, change)


def service_cidr_event(event: str, obj: Mapping[str, Any]) -> Mutation:
    """One watch event of a ServiceCIDR: added, modified or deleted."""

    def change(state: ClusterState) -> list[InvalidObjectError]:
        if event == "DELETED":
            state.delete_service_cidr(object_key(obj).name)
            return []
        return _update_service_cidr(state, obj)

    return _one(Kind.SERVICE_CIDR, change)


def combine(*mutations: Mutation) -> Mutation:
    """Several mutations applied as one, so no sync sees half of them."""
    return Mutation(tuple(part for mutation in mutations for part in mutation.parts))
