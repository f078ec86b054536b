"""Feeding Kubernetes objects into ClusterState. Shared by the file source and the API watch.

Each function converts one object; an invalid object raises InvalidObjectError (naming object and
field) after removing whatever the state held for it, so the rest of the cluster is unaffected."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kproxy.errors import InvalidObjectError
from kproxy.model.convert import (
    build_endpoint_slice,
    build_node,
    build_service_ports,
)
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName
from kproxy.state.cluster import ClusterState


def object_key(obj: Mapping[str, Any]) -> NamespacedName:
    meta = obj.get("metadata") or {}
    return NamespacedName(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def update_service(state: ClusterState, obj: Mapping[str, Any]) -> None:
    key = object_key(obj)
    try:
        ports = build_service_ports(obj)
    except InvalidObjectError:
        state.delete_service(key)
        raise
    if ports:
        state.set_service(key, ports)
    else:
        state.delete_service(key)


def update_endpoint_slice(state: ClusterState, obj: Mapping[str, Any]) -> None:
    key = object_key(obj)
    try:
        info = build_endpoint_slice(obj)
    except InvalidObjectError:
        state.delete_slice(key)
        raise
    if info is None:
        state.delete_slice(key)
    else:
        state.set_slice(info)


def node_for(name: str, objects: list[dict[str, Any]]) -> NodeInfo:
    """The Node named `name` among `objects`, or a bare NodeInfo when it is not there."""
    for obj in objects:
        if object_key(obj).name == name:
            return build_node(obj)
    return NodeInfo(name=name)
