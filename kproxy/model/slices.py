"""EndpointSlices as kproxy keeps them, and the conversion of a slice's ports and endpoints.

One endpoint with a bad field is left out (and reported), not the whole slice: the rest of the
slice's endpoints are still good backends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kproxy.errors import InvalidObjectError
from kproxy.model.addresses import canonical_ipv4, ip_family, parse_ip
from kproxy.model.endpoint import Endpoint
from kproxy.model.fields import FieldReader, show
from kproxy.model.service import NamespacedName, Protocol

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
_PROTOCOLS = tuple(p.value for p in Protocol)


@dataclass(frozen=True, slots=True)
class EndpointSlicePort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    """What kproxy keeps of one EndpointSlice."""

    key: NamespacedName
    service: NamespacedName
    address_type: str
    ports: tuple[EndpointSlicePort, ...]
    endpoints: tuple[Endpoint, ...]
    # When the change behind this version of the slice happened (epoch seconds), if known.
    trigger_time: float | None = field(default=None, compare=False)
    # Endpoints left out for a bad field, one error each (the caller logs them).
    skipped: tuple[InvalidObjectError, ...] = field(default=(), compare=False)


def _slice_ports(reader: FieldReader, obj: Mapping[str, Any]) -> tuple[EndpointSlicePort, ...]:
    """The API server refuses a name that is not a DNS-1123 label, a duplicate name and an
    unknown protocol: those refuse the slice. It does not check the number: kube-proxy ignores
    a port without one or with 0, and one out of range is ignored here too."""
    ports = []
    seen: dict[str, str] = {}
    for i, item in enumerate(reader.sequence(obj.get("ports"), "ports")):
        path = f"ports[{i}]"
        p = reader.mapping(item, path)
        name = reader.port_name(p, path)
        if name in seen:
            raise reader.fail(path + ".name", f"duplicate port name {show(name)} (as {seen[name]})")
        seen[name] = path
        protocol = Protocol(reader.choice(p.get("protocol"), path + ".protocol", _PROTOCOLS))
        if p.get("port") is None or (type(p.get("port")) is int and p["port"] == 0):
            continue  # no port number: upstream programs nothing for it
        try:
            port = reader.integer(p.get("port"), path + ".port", 1, 65535)
        except InvalidObjectError as exc:
            reader.ignore(exc, "this port is ignored")
            continue
        ports.append(EndpointSlicePort(name, port, protocol))
    return tuple(ports)


def _hint_names(reader: FieldReader, value: Any, path: str) -> tuple[str, ...]:
    names = []
    for i, item in enumerate(reader.sequence(value, path)):
        hint = reader.mapping(item, f"{path}[{i}]")
        names.append(reader.string(hint.get("name"), f"{path}[{i}].name"))
    return tuple(names)


def _endpoint(reader: FieldReader, item: Any, path: str, family: int) -> Endpoint:
    """The API server requires an address and refuses special ones (ValidateNonSpecialIP);
    kube-proxy uses the first address and skips an endpoint of the other family."""
    ep = reader.mapping(item, path)
    addresses = reader.sequence(ep.get("addresses"), path + ".addresses")
    if not addresses:
        raise reader.fail(path + ".addresses", "missing")
    ip = parse_ip(reader, addresses[0], path + ".addresses[0]")
    if ip_family(ip) != family:
        raise reader.fail(path + ".addresses[0]", f"{ip} is not IPv{family}")
    cond = reader.mapping(ep.get("conditions"), path + ".conditions")
    # Unset conditions read as kube-proxy reads them: ready and serving, not terminating (a
    # serving condition unset on a terminating endpoint, as controllers older than the field
    # write it, counts as serving).
    ready = reader.boolean(cond.get("ready"), path + ".conditions.ready", True)
    serving = reader.boolean(cond.get("serving"), path + ".conditions.serving", True)
    terminating = reader.boolean(cond.get("terminating"), path + ".conditions.terminating", False)
    hints = reader.mapping(ep.get("hints"), path + ".hints")
    return Endpoint(
        ip=ip,
        port=0,
        ready=ready,
        serving=serving,
        terminating=terminating,
        node_name=reader.string(ep.get("nodeName"), path + ".nodeName"),
        zone_hints=_hint_names(reader, hints.get("forZones"), path + ".hints.forZones"),
        node_hints=_hint_names(reader, hints.get("forNodes"), path + ".hints.forNodes"),
    )


def _plain_endpoint(item: Any, family: int) -> Endpoint | None:
    """_endpoint's result for the common shape: a dict, an IPv4 address parse_ip takes, boolean
    conditions, a string node name, no hints. It builds none of the field paths _endpoint names
    in its errors (half its cost); None for any other shape, which _endpoint reads and words."""
    if family != 4 or type(item) is not dict:
        return None
    addresses = item.get("addresses")
    if type(addresses) is not list or not addresses or type(addresses[0]) is not str:
        return None
    ip = canonical_ipv4(addresses[0])
    cond = item.get("conditions")
    node_name = item.get("nodeName")
    if ip is None or item.get("hints") is not None:
        return None
    if cond is None:
        cond = {}
    elif type(cond) is not dict:
        return None
    ready, serving, terminating = cond.get("ready"), cond.get("serving"), cond.get("terminating")
    if ready is None:
        ready = True
    if serving is None:
        serving = True
    if terminating is None:
        terminating = False
    if type(ready) is not bool or type(serving) is not bool or type(terminating) is not bool:
        return None
    if node_name is None:
        node_name = ""
    elif type(node_name) is not str:
        return None
    return Endpoint(ip, 0, ready, serving, terminating, node_name)


def _trigger_time(annotations: Mapping[str, str]) -> float | None:
    value = annotations.get(TRIGGER_TIME_ANNOTATION)
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        return None  # a bad annotation only costs the latency metric


def build_slice_contents(
    reader: FieldReader,
    obj: Mapping[str, Any],
    key: NamespacedName,
    service: NamespacedName,
    annotations: Mapping[str, str],
) -> EndpointSliceInfo:
    """The slice's ports and endpoints (metadata already checked by the caller)."""
    address_type = str(obj.get("addressType"))
    family = 4 if address_type == "IPv4" else 6
    ports = _slice_ports(reader, obj)
    endpoints, skipped = [], list(reader.skipped)
    for i, item in enumerate(reader.sequence(obj.get("endpoints"), "endpoints")):
        endpoint = _plain_endpoint(item, family)
        if endpoint is not None:
            endpoints.append(endpoint)
            continue
        try:
            endpoints.append(_endpoint(reader, item, f"endpoints[{i}]", family))
        except InvalidObjectError as exc:
            skipped.append(
                InvalidObjectError(exc.obj, exc.field, exc.problem + "; endpoint skipped")
            )
    return EndpointSliceInfo(
        key=key,
        service=service,
        address_type=address_type,
        ports=ports,
        endpoints=tuple(endpoints),
        trigger_time=_trigger_time(annotations),
        skipped=tuple(skipped),
    )
