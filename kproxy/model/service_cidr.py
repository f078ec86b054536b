"""networking.k8s.io/v1 ServiceCIDR: the ranges the cluster allocates ClusterIPs from. Upstream's
nftables mode drops new connections to an address in them that no Service holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.errors import InvalidObjectError
from kproxy.model.addresses import parse_cidr
from kproxy.model.convert import object_ref
from kproxy.model.fields import FieldReader


@dataclass(frozen=True, slots=True)
class ServiceCIDRInfo:
    name: str
    cidrs: tuple[str, ...]
    # CIDRs left out for a bad value, one error each (the caller warns).
    skipped: tuple[InvalidObjectError, ...] = field(default=(), compare=False)


def build_service_cidr(obj: Any) -> ServiceCIDRInfo:
    """A ServiceCIDR's name and `spec.cidrs`; a bad CIDR is left out with a warning (the API
    server refuses one, so only a broken source sends it)."""
    reader = FieldReader(object_ref(obj, "ServiceCIDR").replace(" default/", " ", 1))
    if not isinstance(obj, Mapping):
        raise reader.fail("(object)", "must be a mapping")
    meta = reader.mapping(obj.get("metadata"), "metadata")
    name = reader.string(meta.get("name"), "metadata.name")
    if not name:
        raise reader.fail("metadata.name", "missing")
    spec = reader.mapping(obj.get("spec"), "spec")
    cidrs: list[str] = []
    for i, value in enumerate(reader.sequence(spec.get("cidrs"), "spec.cidrs")):
        try:
            cidrs.append(parse_cidr(reader, value, f"spec.cidrs[{i}]"))
        except InvalidObjectError as exc:
            reader.ignore(exc, "that CIDR is left out")
    return ServiceCIDRInfo(name, tuple(cidrs), tuple(reader.skipped))
