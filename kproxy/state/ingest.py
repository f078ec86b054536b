"""Feeding Kubernetes objects into ClusterState. Shared by the file source and the API watch.

Each function converts one object; an invalid object raises InvalidObjectError (naming object and
field) after removing whatever the state held for it, so the rest of the cluster is unaffected.
That holds for any exception the converter raises: one object the converter cannot handle must
never stop a source from delivering the others."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from kproxy.errors import InvalidObjectError
from kproxy.model.convert import (
    build_endpoint_slice,
    build_node,
    build_service_ports,
)
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName
from kproxy.state.cluster import ClusterState

T = TypeVar("T")


def object_key(obj: Mapping[str, Any]) -> NamespacedName:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}  # a malformed object keys as "default/"
    return NamespacedName(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def _convert(kind: str, build: Callable[[Mapping[str, Any]], T], obj: Mapping[str, Any]) -> T:
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
    key = object_key(obj)
    try:
        ports = _convert("Service", build_service_ports, obj)
    except InvalidObjectError:
        state.delete_service(key)
        raise
    if ports:
        state.set_service(key, ports)
    else:
        state.delete_service(key)
    return []


def update_endpoint_slice(state: ClusterState, obj: Mapping[str, Any]) -> list[InvalidObjectError]:
    """Returns the slice's skipped endpoints, one error each."""
    key = object_key(obj)
    try:
        info = _convert("EndpointSlice", build_endpoint_slice, obj)
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
            return _convert("Node", build_node, obj)
    return NodeInfo(name=name)


Mutation = Callable[[ClusterState], list[InvalidObjectError]]


def _each(
    objs: Iterable[Mapping[str, Any]],
    update: Callable[[ClusterState, Mapping[str, Any]], list[InvalidObjectError]],
) -> Mutation:
    def mutate(state: ClusterState) -> list[InvalidObjectError]:
        errors = []
        for obj in objs:
            try:
                errors.extend(update(state, obj))
            except InvalidObjectError as exc:
                errors.append(exc)
        return errors

    return mutate


def upsert(kind: str, obj: Mapping[str, Any]) -> Mutation:
    """Add or update one Service or EndpointSlice."""
    return _each([obj], update_service if kind == "Service" else update_endpoint_slice)


def remove(kind: str, obj: Mapping[str, Any]) -> Mutation:
    key = object_key(obj)

    def mutate(state: ClusterState) -> list[InvalidObjectError]:
        if kind == "Service":
            state.delete_service(key)
        else:
            state.delete_slice(key)
        return []

    return mutate


def replace_all(kind: str, objs: Sequence[Mapping[str, Any]]) -> Mutation:
    """Make the state hold exactly these Services (or EndpointSlices): a (re)list."""
    keys = {object_key(o) for o in objs}
    apply_each = _each(objs, update_service if kind == "Service" else update_endpoint_slice)

    def mutate(state: ClusterState) -> list[InvalidObjectError]:
        if kind == "Service":
            for key in state.service_keys() - keys:
                state.delete_service(key)
        else:
            for key in state.slice_keys() - keys:
                state.delete_slice(key)
        return apply_each(state)

    return mutate


def set_objects(kind: str, objects: Mapping[NamespacedName, Mapping[str, Any] | None]) -> Mutation:
    """Set these Services (or EndpointSlices) to these objects and remove those mapped to None;
    every other object stays as it is. A change to one manifest file is one of these."""
    update = update_service if kind == "Service" else update_endpoint_slice
    present = [obj for obj in objects.values() if obj is not None]
    gone = [key for key, obj in objects.items() if obj is None]
    apply_each = _each(present, update)

    def mutate(state: ClusterState) -> list[InvalidObjectError]:
        for key in gone:
            if kind == "Service":
                state.delete_service(key)
            else:
                state.delete_slice(key)
        return apply_each(state)

    return mutate


def set_node(name: str, objs: Sequence[Mapping[str, Any]]) -> Mutation:
    """The state's Node becomes the object named `name` among `objs` (or a bare one)."""

    def mutate(state: ClusterState) -> list[InvalidObjectError]:
        try:
            state.node = node_for(name, [dict(o) for o in objs])
        except InvalidObjectError as exc:
            state.node = NodeInfo(name=name)
            return [exc]
        return []

    return mutate


def combine(*mutations: Mutation) -> Mutation:
    """Several mutations applied as one, so no sync sees half of them."""

    def mutate(state: ClusterState) -> list[InvalidObjectError]:
        return [exc for mutation in mutations for exc in mutation(state)]

    return mutate
