"""A small in-process Kubernetes API server for tests, spoken to by the real `kubernetes` client.

No real kube-apiserver can be installed here, so this module serves the REST and watch protocol for
the three resources kproxy reads: core/v1 Services, discovery.k8s.io/v1 EndpointSlices and core/v1
Nodes, plus minimal discovery documents (/api, /apis, /version). It is stdlib only (a
ThreadingHTTPServer and threads) and listens on plain HTTP, by default on 127.0.0.1 and an
ephemeral port. It is test support, never shipped as a feature.

What it does as the real API server does:

- One global resourceVersion counter. Every create, update and delete bumps it and stamps the new
  value on the object; create also sets uid and creationTimestamp. A PUT that changes nothing is a
  no-op (no new resourceVersion, no event), as on a real server.
- Lists (`kind: ServiceList` ...) carry `metadata.resourceVersion`; their items omit kind and
  apiVersion. Label selectors (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
  comma-separated) and field selectors (`metadata.name`, `metadata.namespace`; `=`, `==`, `!=`)
  filter lists and watches; `limit`/`continue` page through a consistent snapshot.
- Watches (`?watch=true`) answer with a chunked stream of JSON lines
  `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": {...}}`. From a resourceVersion they
  replay the retained history newer than it, then stream live; from "" or "0" they start with
  ADDED events for the current objects. A resourceVersion older than the oldest retained event (see
  `compact()`) gets an ERROR event carrying a 410 "Expired" Status, and the stream ends. An object
  that stops (starts) matching a watch's selectors is reported as DELETED (ADDED), as the watch
  cache does. `allowWatchBookmarks=true` gets a BOOKMARK every `bookmark_interval` seconds,
  `timeoutSeconds` ends the stream after that long, `sendInitialEvents=true` sends the current
  objects then a BOOKMARK annotated `k8s.io/initial-events-end`.
- Errors are `Status` objects with the real reasons (NotFound, AlreadyExists, Conflict, ...).

Test controls (all thread-safe): `create/update/apply/delete/get/objects`, `compact()`, `stop()` and
`start()` (an outage: the listening socket and every open connection are closed abruptly, then the
same port is bound again), `end_watches()` (streams end cleanly, as on a server-side timeout),
`force_410_next_watch()`, `inject_error()`, and request counters (`count("list", "Service")`,
`wait_for_count`, `active_watches`, `wait_for_watches`).

    with running_apiserver() as server:
        server.create("Service", {"metadata": {"name": "web"}, "spec": {...}})
        core = kubernetes.client.CoreV1Api(server.api_client())

Standalone: `python -m integration.apiserver --port N [--manifests DIR]` loads Services,
EndpointSlices and Nodes from YAML/JSON manifests (as `kubectl get -o yaml` prints them), prints
the URL on stdout once listening, and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import logging
import re
import secrets
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import yaml

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger(__name__)

JSON = dict[str, Any]

ADDED, MODIFIED, DELETED, BOOKMARK, ERROR = "ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"
VERBS = ("list", "watch", "get", "create", "update", "delete", "patch", "discovery")
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
KUBERNETES_VERSION = {
    "major": "1",
    "minor": "34",
    "gitVersion": "v1.34.0",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-08-27T00:00:00Z",
    "goVersion": "go1.24.6",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_TRUE = frozenset({"1", "t", "T", "true", "True", "TRUE"})
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_MAX_SNAPSHOTS = 256


@dataclass(frozen=True)
class Resource:
    """One served resource type."""

    kind: str
    plural: str
    group: str
    version: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    # The real API returns the deleted object for Services and a Success Status for the others.
    delete_returns_object: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("apis", self.group, self.version) if self.group else ("api", self.version)

    def discovery(self) -> JSON:
        verbs = ["create", "delete", "get", "list", "update", "watch"]
        doc: JSON = {
            "name": self.plural,
            "singularName": self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        }
        if self.short_names:
            doc["shortNames"] = list(self.short_names)
        return doc


SERVICES = Resource("Service", "services", "", "v1", True, ("svc",), delete_returns_object=True)
ENDPOINT_SLICES = Resource("EndpointSlice", "endpointslices", "discovery.k8s.io", "v1", True)
NODES = Resource("Node", "nodes", "", "v1", False, ("no",))
SERVICE_CIDRS = Resource("ServiceCIDR", "servicecidrs", "networking.k8s.io", "v1", False)
RESOURCES = (SERVICES, ENDPOINT_SLICES, NODES, SERVICE_CIDRS)
_GROUPS = sorted({r.group for r in RESOURCES if r.group})


def resource_for(kind: str | Resource) -> Resource:
    """The Resource named by kind ("Service"), plural ("services"), singular or short name."""
    if isinstance(kind, Resource):
        return kind
    wanted = kind.lower()
    for resource in RESOURCES:
        if wanted in (resource.kind.lower(), resource.plural, *resource.short_names):
            return resource
    served = ", ".join(r.kind for r in RESOURCES)
    raise KeyError(f"not a served resource: {kind!r} (served: {served})")


class ApiError(Exception):
    """An error answered as a `Status` object with this HTTP code."""

    def __init__(self, code: int, message: str, reason: str = "", details: JSON | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> JSON:
        return status_object(self.code, self.reason, self.message, self.details)


def status_object(code: int, reason: str, message: str, details: JSON | None = None) -> JSON:
    obj: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        obj["details"] = details
    return obj


def _not_found(resource: Resource, name: str) -> ApiError:
    details = {"name": name, "group": resource.group, "kind": resource.plural}
    return ApiError(404, f'{resource.plural} "{name}" not found', "NotFound", details)


def _conflict(resource: Resource, name: str, why: str) -> ApiError:
    details = {"name": name, "group": resource.group, "kind": resource.plural}
    message = f'Operation cannot be fulfilled on {resource.plural} "{name}": {why}'
    return ApiError(409, message, "Conflict", details)


# --------------------------------------------------------------------------------------------
# Selectors


_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_KEY = rf"(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?{_NAME}"
_VALUE = rf"(?:{_NAME})?"
_TERM_NOT_EXISTS = re.compile(rf"^!\s*({_KEY})$")
_TERM_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s*\((.*)\)$")
_TERM_EQUALITY = re.compile(rf"^({_KEY})\s*(==|!=|=)\s*({_VALUE})$")
_TERM_EXISTS = re.compile(rf"^({_KEY})$")
_VALUE_ONLY = re.compile(rf"^{_VALUE}$")


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector."""

    key: str
    op: str  # "exists", "!exists", "in" or "notin"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "in":
            return self.key in labels and labels[self.key] in self.values
        return labels.get(self.key) not in self.values  # notin, !=: an absent label matches


def _split_terms(selector: str) -> list[str]:
    """Split on the commas that are not inside a `key in (a,b)` value list."""
    terms: list[str] = []
    depth, start = 0, 0
    for i, char in enumerate(selector):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [term.strip() for term in terms]


def parse_label_selector(selector: str | None) -> tuple[Requirement, ...]:
    """Parse a label selector as the API server does; raise ApiError(400) when it is malformed."""
    if not selector or not selector.strip():
        return ()
    requirements: list[Requirement] = []
    for term in _split_terms(selector):
        if m := _TERM_NOT_EXISTS.match(term):
            requirements.append(Requirement(m[1], "!exists"))
        elif m := _TERM_SET.match(term):
            values = [v.strip() for v in m[3].split(",")]
            if not all(_VALUE_ONLY.match(v) for v in values):
                raise ApiError(400, f"unable to parse requirement: invalid values in {term!r}")
            requirements.append(Requirement(m[1], m[2], frozenset(values)))
        elif m := _TERM_EQUALITY.match(term):
            op = "notin" if m[2] == "!=" else "in"
            requirements.append(Requirement(m[1], op, frozenset({m[3]})))
        elif m := _TERM_EXISTS.match(term):
            requirements.append(Requirement(m[1], "exists"))
        else:
            raise ApiError(400, f"unable to parse requirement: {term!r} in selector {selector!r}")
    return tuple(requirements)


_FIELDS = {"metadata.name": "name", "metadata.namespace": "namespace"}
_FIELD_TERM = re.compile(r"^([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*)$")


@dataclass(frozen=True)
class FieldRequirement:
    field: str  # a key of the object's metadata
    equal: bool
    value: str

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        return (str(metadata.get(self.field) or "") == self.value) == self.equal


def parse_field_selector(selector: str | None) -> tuple[FieldRequirement, ...]:
    """Parse a field selector on metadata.name / metadata.namespace; raise ApiError(400) else."""
    if not selector or not selector.strip():
        return ()
    requirements: list[FieldRequirement] = []
    for term in selector.split(","):
        m = _FIELD_TERM.match(term.strip())
        if m is None:
            raise ApiError(400, f"invalid selector: {selector!r}; can't understand {term!r}")
        if m[1] not in _FIELDS:
            raise ApiError(400, f'field label not supported: "{m[1]}"')
        requirements.append(FieldRequirement(_FIELDS[m[1]], m[2] != "!=", m[3].strip()))
    return tuple(requirements)


@dataclass(frozen=True)
class Selector:
    """Which objects a list or watch sees: a namespace (None: all) and label/field selectors."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        metadata = obj.get("metadata") or {}
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        labels = metadata.get("labels") or {}
        return all(r.matches(labels) for r in self.labels) and all(
            r.matches(metadata) for r in self.fields
        )


# --------------------------------------------------------------------------------------------
# Store, history and watchers


@dataclass(frozen=True)
class _Event:
    rv: int
    resource: Resource
    type: str
    obj: JSON  # stored form (no kind/apiVersion); never mutated once stored
    old: JSON | None


@dataclass
class _Watcher:
    resource: Resource
    selector: Selector
    queue: deque[tuple[str, JSON]] = field(default_factory=deque)
    ended: str = ""  # "", "graceful" (end the stream cleanly) or "abort" (drop it)

    def translate(self, event: _Event) -> tuple[str, JSON] | None:
        """The event as this watcher sees it through its selector (None: not at all)."""
        now = self.selector.matches(event.obj)
        before = event.old is not None and self.selector.matches(event.old)
        if event.type == DELETED:
            kind = DELETED if before else None
        elif now:
            kind = MODIFIED if before else ADDED
        else:
            kind = DELETED if before else None
        return None if kind is None else (kind, full_object(event.resource, event.obj))


def full_object(resource: Resource, obj: Mapping[str, Any]) -> JSON:
    """The object as served on its own (GET, watch): kind and apiVersion first."""
    return {"kind": resource.kind, "apiVersion": resource.api_version, **obj}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    metadata = obj["metadata"]
    return (metadata.get("namespace") or "", metadata["name"])


def _without_rv(obj: Mapping[str, Any]) -> JSON:
    metadata = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": metadata}


def _to_mapping(obj: Any) -> JSON:
    """A plain dict from a dict or a kubernetes client model (V1Service, ...)."""
    if isinstance(obj, Mapping):
        return copy.deepcopy(dict(obj))
    if hasattr(obj, "to_dict"):
        from kubernetes.client import ApiClient

        result = ApiClient().sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
        if isinstance(result, dict):
            return result
    raise TypeError(f"expected a mapping or a kubernetes model, got {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# The server


class ApiServer:
    """The API server: state, test controls and the HTTP listener (see the module docstring)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        bookmark_interval: float = 1.0,
        default_watch_timeout: float | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._lifecycle = threading.Lock()
        self._rv = 0
        self._floor = 0  # watches from a resourceVersion below this get 410 Expired
        self._store: dict[Resource, dict[tuple[str, str], JSON]] = {r: {} for r in RESOURCES}
        self._history: list[_Event] = []
        self._watchers: list[_Watcher] = []
        self._snapshots: dict[str, tuple[int, list[JSON]]] = {}
        self._forced_410: Counter[Resource | None] = Counter()
        self._injected: list[list[Any]] = []  # [verb, resource or None, code, times left]
        self._counts: Counter[tuple[str, str]] = Counter()
        self._requests: deque[tuple[str, str]] = deque(maxlen=10_000)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._bound_before = False

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one chosen by the first start())."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> ApiServer:
        """Listen (again) on the same host and port; a no-op when already listening."""
        with self._lifecycle:
            if self._httpd is not None:
                return self
            httpd = self._bind()
            self._port = httpd.server_address[1]
            self._httpd = httpd
            self._thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"apiserver-{self._port}",
                daemon=True,
            )
            self._thread.start()
            return self

    def _bind(self) -> _HTTPServer:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                httpd = _HTTPServer((self.host, self._port), self)
                self._bound_before = True
                return httpd
            except OSError:
                # The same port again after stop(): retry briefly if something still holds it.
                if not self._bound_before or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """An outage: stop accepting, close the listening socket and drop every open connection
        (watch streams end without their final chunk). The objects and history are kept."""
        with self._lifecycle:
            httpd, thread = self._httpd, self._thread
            if httpd is None:
                return
            self._httpd = self._thread = None
            httpd.shutdown()
            httpd.server_close()
            with self._cond:
                for watcher in self._watchers:
                    watcher.ended = "abort"
                self._watchers.clear()
                self._cond.notify_all()
            httpd.drop_connections()
            if thread is not None:
                thread.join()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api_client(self) -> ApiClient:
        """A kubernetes ApiClient configured for this server."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    def kubeconfig(self) -> JSON:
        """A kubeconfig (as a dict) whose current context points at this server."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "apiserver", "cluster": {"server": self.url}}],
            "users": [{"name": "apiserver", "user": {}}],
            "contexts": [
                {"name": "apiserver", "context": {"cluster": "apiserver", "user": "apiserver"}}
            ],
            "current-context": "apiserver",
        }

    def write_kubeconfig(self, path: Path | str) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.kubeconfig(), sort_keys=False))
        return path

    # -- objects (Python API) -------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The current (latest) resourceVersion."""
        with self._lock:
            return str(self._rv)

    def create(self, kind: str | Resource, obj: Any) -> JSON:
        """Create an object (a dict or a client model). A uid or creationTimestamp it carries is
        kept; a resourceVersion is replaced. Raises ApiError 409 if it exists."""
        return self._create(resource_for(kind), _to_mapping(obj), None, from_api=False)

    def update(self, kind: str | Resource, obj: Any) -> JSON:
        """Replace an existing object unconditionally (its resourceVersion is ignored). Raises
        ApiError 404 if it does not exist. Changing nothing is a no-op, as on a real server."""
        return self._update(resource_for(kind), _to_mapping(obj), None, None, from_api=False)

    def apply(self, kind: str | Resource, obj: Any) -> JSON:
        """Create the object, or replace it if it exists."""
        resource, mapping = resource_for(kind), _to_mapping(obj)
        with self._lock:
            metadata = mapping.get("metadata") or {}
            namespace = (metadata.get("namespace") or "default") if resource.namespaced else ""
            if (namespace, metadata.get("name")) in self._store[resource]:
                return self._update(resource, mapping, None, None, from_api=False)
            return self._create(resource, mapping, None, from_api=False)

    def delete(self, kind: str | Resource, obj: Any, namespace: str | None = None) -> JSON:
        """Delete an object given as a name (+ namespace) or as the object itself; return its
        final state. Raises ApiError 404 if it does not exist."""
        resource = resource_for(kind)
        if isinstance(obj, str):
            name = obj
        else:
            metadata = _to_mapping(obj).get("metadata") or {}
            name = metadata["name"]
            namespace = namespace or metadata.get("namespace")
        return self._delete(resource, self._namespace_of(resource, namespace), name, {})

    def get(self, kind: str | Resource, name: str, namespace: str | None = None) -> JSON | None:
        resource = resource_for(kind)
        with self._lock:
            obj = self._store[resource].get((self._namespace_of(resource, namespace), name))
            return None if obj is None else copy.deepcopy(full_object(resource, obj))

    def objects(self, kind: str | Resource, namespace: str | None = None) -> list[JSON]:
        """The current objects of a kind (in one namespace, or all), as GET returns them."""
        resource = resource_for(kind)
        with self._lock:
            items = sorted(self._store[resource].items())
            return [
                copy.deepcopy(full_object(resource, obj))
                for (ns, _), obj in items
                if namespace is None or ns == namespace
            ]

    def load_manifests(self, path: Path | str) -> list[JSON]:
        """Apply every Service, EndpointSlice and Node found in a YAML/JSON file or a directory
        of them (multi-document YAML and `kind: List` accepted); others are logged and skipped."""
        loaded: list[JSON] = []
        for kind, obj in read_manifests(Path(path)):
            loaded.append(self.apply(kind, obj))
        return loaded

    # -- test controls --------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: a watch from any resourceVersion
        older than the current one gets 410 Expired, and so does a pending list `continue`.
        Open watches go on."""
        with self._lock:
            self._history.clear()
            self._floor = self._rv
            self._snapshots.clear()

    def force_410_next_watch(self, kind: str | Resource | None = None, times: int = 1) -> None:
        """Answer the next `times` watch requests (of this kind, or any) with 410 Expired. The
        client retries once after a 410 (unless timeout_seconds was given): times=2 makes it
        raise ApiException(410)."""
        with self._lock:
            self._forced_410[None if kind is None else resource_for(kind)] += times

    def inject_error(
        self, verb: str, kind: str | Resource | None = None, code: int = 500, times: int = 1
    ) -> None:
        """Fail the next `times` requests of this verb ("list", "watch", "get", "create",
        "update", "delete") and kind (None: any) with an HTTP error and a Status body."""
        if verb not in VERBS:
            raise ValueError(f"verb must be one of {VERBS}")
        with self._lock:
            resource = None if kind is None else resource_for(kind)
            self._injected.append([verb, resource, code, times])

    def end_watches(self, kind: str | Resource | None = None) -> int:
        """End the open watch streams cleanly (as a server-side timeout does); return how many."""
        resource = None if kind is None else resource_for(kind)
        with self._cond:
            ended = [w for w in self._watchers if resource in (None, w.resource) and not w.ended]
            for watcher in ended:
                watcher.ended = "graceful"
            self._cond.notify_all()
            return len(ended)

    def active_watches(self, kind: str | Resource | None = None) -> int:
        resource = None if kind is None else resource_for(kind)
        with self._lock:
            return sum(1 for w in self._watchers if resource in (None, w.resource))

    def wait_for_watches(
        self, n: int = 1, kind: str | Resource | None = None, timeout: float = 5.0
    ) -> bool:
        """Wait until at least n watches (of this kind) are open; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.active_watches(kind) >= n, timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until predicate() holds, re-checked on every request and change; False on
        timeout. The predicate may call the other methods (the lock is re-entrant)."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def count(self, verb: str, kind: str | Resource | None = None) -> int:
        """How many requests of this verb (and kind) were received, errors included."""
        with self._lock:
            if kind is None:
                return sum(n for (v, _), n in self._counts.items() if v == verb)
            return self._counts[(verb, resource_for(kind).kind)]

    def counts(self) -> dict[tuple[str, str], int]:
        """All request counters, keyed by (verb, kind); discovery requests have kind ""."""
        with self._lock:
            return dict(self._counts)

    def wait_for_count(
        self, verb: str, kind: str | Resource | None = None, n: int = 1, timeout: float = 5.0
    ) -> bool:
        """Wait until count(verb, kind) >= n; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.count(verb, kind) >= n, timeout)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[tuple[str, str]]:
        """The (method, path?query) of the latest requests received, oldest first."""
        with self._lock:
            return list(self._requests)

    # -- internals: writes ------------------------------------------------------------------------

    @staticmethod
    def _namespace_of(resource: Resource, namespace: str | None) -> str:
        return (namespace or "default") if resource.namespaced else ""

    def _commit(self, resource: Resource, type_: str, obj: JSON, old: JSON | None) -> None:
        """Record a change (the lock is held): new resourceVersion, store, history, watchers."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = _key(obj)
        if type_ == DELETED:
            del self._store[resource][key]
        else:
            self._store[resource][key] = obj
        event = _Event(self._rv, resource, type_, obj, old)
        self._history.append(event)
        for watcher in self._watchers:
            if watcher.resource is resource and not watcher.ended:
                seen = watcher.translate(event)
                if seen is not None:
                    watcher.queue.append(seen)
        self._cond.notify_all()

    @staticmethod
    def _check_body(resource: Resource, obj: JSON) -> JSON:
        """Check kind/apiVersion, strip them; return the metadata dict."""
        for key, expected in (("kind", resource.kind), ("apiVersion", resource.api_version)):
            value = obj.pop(key, None)
            if value not in (None, "", expected):
                raise ApiError(400, f"{key} {value!r} does not match {expected!r} for this path")
        metadata = obj.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise ApiError(400, "metadata must be an object")
        return metadata

    @staticmethod
    def _place(
        resource: Resource, metadata: JSON, namespace: str | None, name: str | None
    ) -> tuple[str, str]:
        """Check the body's name/namespace against the URL's; fill them in."""
        if name is not None:
            if metadata.get("name") not in (None, "", name):
                message = (
                    f"the name of the object ({metadata['name']}) does not match the name on "
                    f"the URL ({name})"
                )
                raise ApiError(400, message)
            metadata["name"] = name
        if resource.namespaced:
            body_namespace = metadata.get("namespace")
            if namespace is not None and body_namespace not in (None, "", namespace):
                message = (
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
                raise ApiError(400, message)
            metadata["namespace"] = namespace or body_namespace or "default"
        else:
            metadata.pop("namespace", None)
        return metadata.get("namespace", ""), metadata.get("name") or ""

    def _create(
        self, resource: Resource, obj: JSON, namespace: str | None, *, from_api: bool
    ) -> JSON:
        metadata = self._check_body(resource, obj)
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)[:5]
        if not metadata.get("name"):
            message = (
                f'{resource.kind} "" is invalid: metadata.name: Required value: name or '
                "generateName is required"
            )
            raise ApiError(422, message, "Invalid")
        if from_api and metadata.get("resourceVersion"):
            raise ApiError(400, "resourceVersion should not be set on objects to be created")
        key = self._place(resource, metadata, namespace, None)
        with self._lock:
            if key in self._store[resource]:
                details = {"name": key[1], "group": resource.group, "kind": resource.plural}
                message = f'{resource.plural} "{key[1]}" already exists'
                raise ApiError(409, message, "AlreadyExists", details)
            if from_api or not metadata.get("uid"):
                metadata["uid"] = str(uuid.uuid4())
            if from_api or not metadata.get("creationTimestamp"):
                metadata["creationTimestamp"] = _now()
            self._commit(resource, ADDED, obj, None)
            return copy.deepcopy(full_object(resource, obj))

    def _update(
        self,
        resource: Resource,
        obj: JSON,
        namespace: str | None,
        name: str | None,
        *,
        from_api: bool,
    ) -> JSON:
        metadata = self._check_body(resource, obj)
        if not metadata.get("name") and name is None:
            raise ApiError(422, "metadata.name: Required value", "Invalid")
        key = self._place(resource, metadata, namespace, name)
        with self._lock:
            current = self._store[resource].get(key)
            if current is None:
                raise _not_found(resource, key[1])
            current_meta = current["metadata"]
            if from_api:
                if metadata.get("uid") not in (None, "", current_meta.get("uid")):
                    why = (
                        f"Precondition failed: UID in precondition: {metadata['uid']}, UID in "
                        f"object meta: {current_meta.get('uid')}"
                    )
                    raise _conflict(resource, key[1], why)
                if metadata.get("resourceVersion") not in (
                    None,
                    "",
                    current_meta["resourceVersion"],
                ):
                    why = (
                        "the object has been modified; please apply your changes to the latest "
                        "version and try again"
                    )
                    raise _conflict(resource, key[1], why)
            metadata["uid"] = current_meta.get("uid")
            metadata["creationTimestamp"] = current_meta.get("creationTimestamp")
            if _without_rv(obj) == _without_rv(current):
                return copy.deepcopy(full_object(resource, current))
            self._commit(resource, MODIFIED, obj, current)
            return copy.deepcopy(full_object(resource, obj))

    def _delete(
        self, resource: Resource, namespace: str, name: str, preconditions: Mapping[str, Any]
    ) -> JSON:
        with self._lock:
            current = self._store[resource].get((namespace, name))
            if current is None:
                raise _not_found(resource, name)
            current_meta = current["metadata"]
            for field_name, key in (("uid", "uid"), ("resourceVersion", "resourceVersion")):
                wanted = preconditions.get(field_name)
                if wanted not in (None, "", current_meta.get(key)):
                    why = (
                        f"Precondition failed: {field_name} in precondition: {wanted}, "
                        f"{field_name} in object meta: {current_meta.get(key)}"
                    )
                    raise _conflict(resource, name, why)
            final = {**current, "metadata": dict(current_meta)}
            self._commit(resource, DELETED, final, current)
            return copy.deepcopy(full_object(resource, final))

    # -- internals: reads -----------------------------------------------------------------------

    def _list(self, resource: Resource, selector: Selector, query: Mapping[str, str]) -> JSON:
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            raise ApiError(400, f"invalid limit: {query.get('limit')!r}") from None
        token = query.get("continue")
        with self._lock:
            if token:
                snapshot = self._snapshots.pop(token, None)
                if snapshot is None:
                    message = (
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter."
                    )
                    raise ApiError(410, message, "Expired")
                rv, items = snapshot
            else:
                rv = self._rv
                items = [o for _, o in sorted(self._store[resource].items()) if selector.matches(o)]
            metadata: JSON = {"resourceVersion": str(rv)}
            if 0 < limit < len(items):
                items, rest = items[:limit], items[limit:]
                token = base64.urlsafe_b64encode(
                    json.dumps({"rv": rv, "id": secrets.token_hex(8)}).encode()
                ).decode()
                self._snapshots[token] = (rv, rest)
                while len(self._snapshots) > _MAX_SNAPSHOTS:
                    del self._snapshots[next(iter(self._snapshots))]
                metadata["continue"] = token
                metadata["remainingItemCount"] = len(rest)
            # Stored objects are never mutated, so serializing them after the lock is safe.
            return {
                "kind": resource.list_kind,
                "apiVersion": resource.api_version,
                "metadata": metadata,
                "items": items,
            }

    def _bookmark(self, resource: Resource, initial_events_end: bool = False) -> JSON:
        metadata: JSON = {"resourceVersion": str(self._rv)}
        if initial_events_end:
            metadata["annotations"] = {INITIAL_EVENTS_END: "true"}
        return {"kind": resource.kind, "apiVersion": resource.api_version, "metadata": metadata}

    def _open_watch(
        self, resource: Resource, selector: Selector, query: Mapping[str, str]
    ) -> tuple[_Watcher | None, JSON | None]:
        """Register a watcher, its queue pre-filled with what it must replay; or return the
        ERROR event object to send instead (410 Expired)."""
        rv_param = query.get("resourceVersion", "")
        initial = query.get("sendInitialEvents", "") in _TRUE
        bookmarks = query.get("allowWatchBookmarks", "") in _TRUE
        with self._cond:
            for forced in (resource, None):
                if self._forced_410[forced] > 0:
                    self._forced_410[forced] -= 1
                    message = f"too old resource version: {rv_param or 0} ({self._rv})"
                    return None, status_object(410, "Expired", message)
            watcher = _Watcher(resource, selector)
            if initial or rv_param in ("", "0"):
                for _, obj in sorted(self._store[resource].items()):
                    if selector.matches(obj):
                        watcher.queue.append((ADDED, full_object(resource, obj)))
                if initial and bookmarks:
                    watcher.queue.append((BOOKMARK, self._bookmark(resource, True)))
            else:
                try:
                    since = int(rv_param)
                except ValueError:
                    raise ApiError(400, f'invalid resource version: "{rv_param}"') from None
                if since < self._floor:
                    message = f"too old resource version: {since} ({self._floor})"
                    return None, status_object(410, "Expired", message)
                for event in self._history:
                    if event.rv > since and event.resource is resource:
                        seen = watcher.translate(event)
                        if seen is not None:
                            watcher.queue.append(seen)
            if self._httpd is None:
                watcher.ended = "abort"  # a request that raced with stop()
            else:
                self._watchers.append(watcher)
            self._cond.notify_all()
            return watcher, None

    def _close_watch(self, watcher: _Watcher) -> None:
        with self._cond:
            if watcher in self._watchers:
                self._watchers.remove(watcher)
            self._cond.notify_all()

    def _pump(
        self,
        watcher: _Watcher,
        write: Callable[[str, JSON], None],
        timeout: float | None,
        bookmarks: bool,
        peer_gone: Callable[[], bool],
    ) -> bool:
        """Stream a watcher's events until it ends; False when the stream must be dropped
        without its final chunk (stop(), or the client went away)."""
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        next_bookmark = start + self.bookmark_interval if bookmarks else None
        while True:
            with self._cond:
                while not watcher.queue and not watcher.ended:
                    now = time.monotonic()
                    wakes = [t for t in (deadline, next_bookmark) if t is not None]
                    if wakes and now >= min(wakes):
                        break
                    # Wake now and then to notice a client that went away.
                    self._cond.wait(min([0.25, *(t - now for t in wakes)]))
                    if not watcher.queue and not watcher.ended and peer_gone():
                        return False
                batch = list(watcher.queue)
                watcher.queue.clear()
                ended = watcher.ended
                now = time.monotonic()
                bookmark = None
                if next_bookmark is not None and now >= next_bookmark and not ended:
                    # The queue is drained: every event up to the current version is in batch.
                    bookmark = self._bookmark(watcher.resource)
                    next_bookmark = now + self.bookmark_interval
            if ended == "abort":
                return False
            for type_, obj in batch:
                write(type_, obj)
            if bookmark is not None:
                write(BOOKMARK, bookmark)
            if ended or (deadline is not None and time.monotonic() >= deadline):
                return True

    def _record(self, method: str, target: str, verb: str, resource: Resource | None) -> None:
        """Count a request and fail it if an injected error matches."""
        with self._cond:
            self._counts[(verb, resource.kind if resource else "")] += 1
            self._requests.append((method, target))
            self._cond.notify_all()
            for injected in self._injected:
                if injected[0] == verb and injected[1] in (None, resource) and injected[3] > 0:
                    injected[3] -= 1
                    if injected[3] == 0:
                        self._injected.remove(injected)
                    raise ApiError(injected[2], f"injected error for {verb}")

    def _discovery(self, parts: list[str]) -> JSON | None:
        """The discovery document at this path, or None."""
        address = [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self._port}"}]

        def group_doc(group: str) -> JSON:
            version = {"groupVersion": f"{group}/v1", "version": "v1"}
            return {"name": group, "versions": [version], "preferredVersion": version}

        def resources(prefix: tuple[str, ...], group_version: str) -> JSON:
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": [r.discovery() for r in RESOURCES if r.prefix == prefix],
            }

        if parts == ["version"]:
            return dict(KUBERNETES_VERSION)
        if parts == ["api"]:
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": address,
            }
        if parts == ["api", "v1"]:
            return resources(("api", "v1"), "v1")
        if parts == ["apis"]:
            groups = [group_doc(g) for g in _GROUPS]
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in _GROUPS:
            return {"kind": "APIGroup", "apiVersion": "v1", **group_doc(parts[1])}
        if len(parts) == 3 and parts[0] == "apis" and parts[1] in _GROUPS and parts[2] == "v1":
            return resources(("apis", parts[1], "v1"), f"{parts[1]}/v1")
        return None


def _route(parts: list[str]) -> tuple[Resource, str | None, str | None] | None:
    """(resource, namespace, name) for a resource path, or None."""
    for resource in RESOURCES:
        n = len(resource.prefix)
        if tuple(parts[:n]) != resource.prefix:
            continue
        rest = parts[n:]
        if rest == [resource.plural]:
            return resource, None, None
        if len(rest) == 2 and rest[0] == resource.plural:
            return (resource, None, rest[1]) if not resource.namespaced else None
        namespaced_path = len(rest) in (3, 4) and rest[0] == "namespaces"
        if resource.namespaced and namespaced_path and rest[2] == resource.plural:
            return resource, rest[1], rest[3] if len(rest) == 4 else None
    return None


# --------------------------------------------------------------------------------------------
# HTTP


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: ApiServer) -> None:
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can hang for seconds in a
        # network namespace without DNS: bind without it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            log.exception("apiserver: error handling a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kproxy-test-apiserver"
    disable_nagle_algorithm = True
    server: _HTTPServer
    _streaming = False  # the response headers of a watch stream have been sent

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("apiserver: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # -- plumbing -------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, code: int, obj: Any) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.write(data)

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _write_event(self, type_: str, obj: JSON) -> None:
        line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n"
        self._send_chunk(line.encode())

    def _peer_gone(self) -> bool:
        """True when the client closed its end (it sends nothing while it reads a watch)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [p for p in url.path.split("/") if p]
        self._streaming = False
        try:
            body = self._read_body()
            self._serve(api, method, parts, query, body)
        except ApiError as exc:
            self._send_json(exc.code, exc.status())
        except OSError:
            self.close_connection = True
        except Exception as exc:
            # A bug in this server: answer 500 (if no stream has started) rather than hang up.
            log.exception("apiserver: %s %s failed", method, self.path)
            self.close_connection = True
            if not self._streaming:
                with suppress(OSError):
                    self._send_json(500, status_object(500, "InternalError", repr(exc)))

    def _serve(
        self,
        api: ApiServer,
        method: str,
        parts: list[str],
        query: dict[str, str],
        body: bytes,
    ) -> None:
        target = self.path
        if parts in (["healthz"], ["readyz"], ["livez"]):
            api._record(method, target, "discovery", None)
            data = b"ok"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        document = api._discovery(parts)
        if document is not None:
            api._record(method, target, "discovery", None)
            if method != "GET":
                raise ApiError(405, f"method {method} not allowed on /{'/'.join(parts)}")
            self._send_json(200, document)
            return
        route = _route(parts)
        if route is None:
            api._record(method, target, "unknown", None)
            raise ApiError(404, f"the server could not find the requested resource ({method})")
        resource, namespace, name = route
        if name is None:
            if method == "GET":
                watching = query.get("watch", "") in _TRUE
                api._record(method, target, "watch" if watching else "list", resource)
                selector = Selector(
                    namespace,
                    parse_label_selector(query.get("labelSelector")),
                    parse_field_selector(query.get("fieldSelector")),
                )
                if watching:
                    self._watch(api, resource, selector, query)
                else:
                    self._send_json(200, api._list(resource, selector, query))
            elif method == "POST" and (namespace is not None or not resource.namespaced):
                api._record(method, target, "create", resource)
                obj = self._json_body(body)
                self._send_json(201, api._create(resource, obj, namespace, from_api=True))
            else:
                api._record(method, target, method.lower(), resource)
                raise ApiError(405, f"method {method} not allowed on this collection")
            return
        ns = api._namespace_of(resource, namespace)
        if method == "GET":
            api._record(method, target, "get", resource)
            with api._lock:
                stored = api._store[resource].get((ns, name))
            if stored is None:
                raise _not_found(resource, name)
            self._send_json(200, full_object(resource, stored))
        elif method == "PUT":
            api._record(method, target, "update", resource)
            obj = self._json_body(body)
            self._send_json(200, api._update(resource, obj, namespace, name, from_api=True))
        elif method == "DELETE":
            api._record(method, target, "delete", resource)
            options = self._json_body(body) if body.strip() else {}
            preconditions = options.get("preconditions") or {}
            final = api._delete(resource, ns, name, preconditions)
            if resource.delete_returns_object:
                self._send_json(200, final)
            else:
                details = {
                    "name": name,
                    "group": resource.group,
                    "kind": resource.plural,
                    "uid": final["metadata"].get("uid"),
                }
                status = {"kind": "Status", "apiVersion": "v1", "metadata": {}}
                self._send_json(200, {**status, "status": "Success", "details": details})
        else:
            api._record(method, target, method.lower(), resource)
            raise ApiError(405, f"method {method} is not supported by this test server")

    @staticmethod
    def _json_body(body: bytes) -> JSON:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, f"the request body is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return obj

    def _watch(
        self, api: ApiServer, resource: Resource, selector: Selector, query: Mapping[str, str]
    ) -> None:
        timeout: float | None = api.default_watch_timeout
        if query.get("timeoutSeconds"):
            try:
                timeout = float(int(query["timeoutSeconds"]))
            except ValueError:
                raise ApiError(
                    400, f"invalid timeoutSeconds: {query['timeoutSeconds']!r}"
                ) from None
        bookmarks = query.get("allowWatchBookmarks", "") in _TRUE
        watcher, error = api._open_watch(resource, selector, query)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache, private")
            self.end_headers()
            self._streaming = True
            if watcher is None:
                assert error is not None
                self._write_event(ERROR, error)
                clean = True
            else:
                clean = api._pump(watcher, self._write_event, timeout, bookmarks, self._peer_gone)
            if clean:
                self._send_chunk(b"")
            else:
                self.close_connection = True
        finally:
            if watcher is not None:
                api._close_watch(watcher)


@contextmanager
def running_apiserver(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    bookmark_interval: float = 1.0,
    default_watch_timeout: float | None = None,
) -> Iterator[ApiServer]:
    """A started ApiServer, stopped on exit (usable as a pytest fixture body)."""
    server = ApiServer(
        host,
        port,
        bookmark_interval=bookmark_interval,
        default_watch_timeout=default_watch_timeout,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Manifests and the standalone process


_MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def read_manifests(path: Path) -> Iterator[tuple[Resource, JSON]]:
    """The served objects in a manifest file or directory; other documents are logged."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _MANIFEST_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    for file in files:
        for i, document in enumerate(yaml.safe_load_all(file.read_text())):
            yield from _manifest_objects(document, f"{file} document {i + 1}")


def _manifest_objects(
    document: Any, where: str, item_kind: str = ""
) -> Iterator[tuple[Resource, JSON]]:
    if document is None:
        return
    if not isinstance(document, dict):
        log.warning("%s: not a Kubernetes object; ignored", where)
        return
    kind = document.get("kind") or item_kind
    if isinstance(kind, str) and kind.endswith("List") and isinstance(document.get("items"), list):
        inner = "" if kind == "List" else kind[: -len("List")]
        for i, item in enumerate(document["items"]):
            yield from _manifest_objects(item, f"{where} items[{i}]", inner)
        return
    try:
        resource = resource_for(str(kind))
    except KeyError:
        log.warning("%s: kind %r is not served; ignored", where, kind)
        return
    if document.get("apiVersion", resource.api_version) != resource.api_version:
        log.warning("%s: apiVersion %r is not served; ignored", where, document.get("apiVersion"))
        return
    yield resource, document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m integration.apiserver",
        description="A small Kubernetes API server (Services, EndpointSlices, Nodes) for tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: an ephemeral port")
    parser.add_argument(
        "--manifests",
        type=Path,
        action="append",
        default=[],
        help="YAML/JSON file or directory of initial objects (repeatable)",
    )
    parser.add_argument("--bookmark-interval", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig for the server here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")

    server = ApiServer(args.host, args.port, bookmark_interval=args.bookmark_interval)
    try:
        for path in args.manifests:
            server.load_manifests(path)
    except (OSError, yaml.YAMLError, ApiError) as exc:
        print(f"apiserver: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    if args.kubeconfig:
        server.write_kubeconfig(args.kubeconfig)
    print(server.url, flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
