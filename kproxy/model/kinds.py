"""The kinds of Kubernetes object kproxy reads."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """A StrEnum: the value is the object's `kind` field and the `kind=` label of the metrics."""

    SERVICE = "Service"
    ENDPOINT_SLICE = "EndpointSlice"
    NODE = "Node"
    SERVICE_CIDR = "ServiceCIDR"
