"""The API source: list then watch Services, EndpointSlices, this node's Node and the cluster's
ServiceCIDRs with the official `kubernetes` client, as kube-proxy's informers do.

Each resource has a reflector thread: list (its resourceVersion starts the watch), then watch with
bookmarks; a 410 Gone means the history is compacted, so it lists again; any other error waits a
capped, jittered, exponential backoff and retries. While the API server is away nothing is
reported, so the rules in the kernel stay as they are.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from kproxy.errors import ConfigError, KproxyError
from kproxy.model.kinds import Kind
from kproxy.state.ingest import (
    KeyedKind,
    Mutation,
    remove,
    replace_all,
    service_cidr_event,
    set_node,
    set_service_cidrs,
    upsert,
)
from kproxy.watch.manifests import Manifests
from kproxy.watch.sink import Sink
from kproxy.watch.supervisor import Backoff, Supervisor

log = structlog.get_logger("kproxy.watch")

# Upstream's informers skip objects meant for another proxy, and headless services.
PROXY_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
WATCH_TIMEOUT_SECONDS = 300
# The longest a healthy reflector can go without news: a watch on a quiet cluster may carry no
# event and, where the server sends no bookmarks, nothing at all until it ends (then the relist
# counts). Health allows this long before calling an API source stale.
IDLE_WATCH_SECONDS = WATCH_TIMEOUT_SECONDS + 60.0


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """In-cluster credentials inside a pod, else the kubeconfig (flag, KUBECONFIG, ~/.kube)."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    for path in _kubeconfig_paths(kubeconfig):
        if not os.path.isfile(path):
            # The client would only say "Invalid kube-config file. No configuration found."
            raise ConfigError(f"kubeconfig {path} does not exist (or is not a file)")
    try:
        api: client.ApiClient = config.new_client_from_config(config_file=kubeconfig)
        return api
    except (config.ConfigException, OSError) as exc:
        where = kubeconfig or "KUBECONFIG / ~/.kube/config"
        raise ConfigError(f"no usable Kubernetes credentials in {where}: {exc}") from exc


def _kubeconfig_paths(kubeconfig: str | None) -> list[str]:
    """The file that must exist: the one named (flag or clientConnection.kubeconfig), else the
    one KUBECONFIG names. A KUBECONFIG list is merged by the client, which skips missing files;
    with neither, the client's own default applies."""
    if kubeconfig:
        return [kubeconfig]
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return listed if len(listed) == 1 else []


class ApiListError(KproxyError):
    """The API server did not answer a list."""


@dataclass
class Resource:
    kind: Kind
    list_fn: Callable[..., Any]
    selectors: dict[str, str]
    on_list: Callable[[list[dict[str, Any]]], Mutation]
    on_event: Callable[[str, dict[str, Any]], Mutation]
    # A resource the cluster may not serve (or not let kproxy read): a 404 or 403 reads as no
    # objects at all, said once, and is asked again after a watch's length.
    optional: bool = False


class Reflector:
    """List and watch one resource, reporting into the sink: the body of a supervised thread."""

    def __init__(self, resource: Resource, sink: Sink) -> None:
        self.resource = resource
        self.sink = sink
        self.unavailable = False  # said once (see Resource.optional)

    def run(self, supervisor: Supervisor) -> None:
        """One list and watch. Returns when the watch ends (the supervisor then lists again at
        once, which also catches anything a bookmark-less gap could have lost) or expires;
        raises on any other error (the supervisor logs it and backs off)."""
        try:
            version = self._list(supervisor)
            self._watch(version, supervisor)
        except ApiException as exc:
            if self.resource.optional and exc.status in (403, 404):
                self._unavailable(exc.status, supervisor)
                return
            if exc.status != 410:
                raise
            log.info("watch_expired", kind=self.resource.kind)  # history compacted: list again

    def _unavailable(self, status: int, supervisor: Supervisor) -> None:
        """Upstream's fallback when the cluster has no ServiceCIDRs: none, so no range check."""
        kind = self.resource.kind
        if not self.unavailable:
            _say_unavailable(kind, status)
        self.unavailable = True
        self.sink.apply(self.resource.on_list([]))
        self.sink.synced(kind)
        supervisor.current()
        supervisor.stop.wait(WATCH_TIMEOUT_SECONDS)

    def _list(self, supervisor: Supervisor) -> str:
        kind = self.resource.kind
        response = self.resource.list_fn(**self.resource.selectors, _preload_content=False)
        body = json.loads(response.data)
        supervisor.handling = f"{kind} list"
        self.sink.apply(self.resource.on_list(body.get("items") or []))
        self.sink.synced(kind)
        supervisor.handling = None
        supervisor.current()
        self.unavailable = False
        version: str = body["metadata"]["resourceVersion"]
        return version

    def _watch(self, version: str, supervisor: Supervisor) -> None:
        w = watch.Watch()
        stream = w.stream(
            self.resource.list_fn,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_SECONDS,
            _request_timeout=(10, WATCH_TIMEOUT_SECONDS + 30),
            **self.resource.selectors,
        )
        for event in stream:
            if supervisor.stop.is_set():
                w.stop()
                return
            change, raw = event["type"], event["raw_object"]
            if change in ("ADDED", "MODIFIED", "DELETED"):
                supervisor.handling = f"{self.resource.kind} {_name(raw)}"
                self.sink.apply(self.resource.on_event(change, raw))
                supervisor.handling = None
            supervisor.current()  # an event or a bookmark: the watch is alive and up to date


def _say_unavailable(kind: Kind, status: int) -> None:
    why = "not served by the API server" if status == 404 else "not allowed by RBAC"
    log.warning("resource_unavailable", kind=kind, status=status, reason=why)


def _list_error(kind: Kind, exc: Exception) -> ApiListError:
    return ApiListError(
        f"cannot list {kind} from the API server ({exc}); check --kubeconfig and that the API "
        "server is reachable"
    )


def _name(obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return "?"
    return f"{meta.get('namespace') or ''}/{meta.get('name') or '?'}".lstrip("/")


def _object_event(kind: KeyedKind) -> Callable[[str, dict[str, Any]], Mutation]:
    def to_mutation(event: str, obj: dict[str, Any]) -> Mutation:
        return remove(kind, obj) if event == "DELETED" else upsert(kind, obj)

    return to_mutation


class ApiSource:
    """Reflectors for Services, EndpointSlices, this node's Node and the ServiceCIDRs."""

    def __init__(self, api: client.ApiClient, node_name: str) -> None:
        core = client.CoreV1Api(api)
        discovery = client.DiscoveryV1Api(api)
        networking = client.NetworkingV1Api(api)
        node_selector = {"field_selector": f"metadata.name={node_name}"}
        self.resources = [
            Resource(
                Kind.SERVICE,
                core.list_service_for_all_namespaces,
                {"label_selector": PROXY_LABEL_SELECTOR},
                lambda items: replace_all(Kind.SERVICE, items),
                _object_event(Kind.SERVICE),
            ),
            Resource(
                Kind.ENDPOINT_SLICE,
                discovery.list_endpoint_slice_for_all_namespaces,
                {"label_selector": PROXY_LABEL_SELECTOR},
                lambda items: replace_all(Kind.ENDPOINT_SLICE, items),
                _object_event(Kind.ENDPOINT_SLICE),
            ),
            Resource(
                Kind.NODE,
                core.list_node,
                node_selector,
                lambda items: set_node(node_name, items),
                lambda event, obj: set_node(node_name, [] if event == "DELETED" else [obj]),
            ),
            Resource(
                Kind.SERVICE_CIDR,
                networking.list_service_cidr,
                {},
                set_service_cidrs,
                service_cidr_event,
                optional=True,
            ),
        ]

    def list_once(self) -> Manifests:
        """One list of each resource, as the agent's reflectors start (`dump --diff`); an
        optional resource the API server does not serve or RBAC forbids lists as none, as the
        agent's reflector takes it."""
        found = Manifests()
        into = {
            Kind.SERVICE: found.services,
            Kind.ENDPOINT_SLICE: found.endpoint_slices,
            Kind.NODE: found.nodes,
            Kind.SERVICE_CIDR: found.service_cidrs,
        }
        for resource in self.resources:
            try:
                response = resource.list_fn(**resource.selectors, _preload_content=False)
                items = json.loads(response.data).get("items") or []
            except ApiException as exc:
                if resource.optional and exc.status in (403, 404):
                    _say_unavailable(resource.kind, exc.status)
                    continue
                raise _list_error(resource.kind, exc) from None
            except (HTTPError, OSError, ValueError) as exc:
                raise _list_error(resource.kind, exc) from None
            into[resource.kind].extend(items)
        return found

    def start(self, sink: Sink, stop: threading.Event) -> list[Supervisor]:
        return [
            Supervisor(
                f"watch-{resource.kind}",
                Reflector(resource, sink).run,
                stop,
                backoff=Backoff(),
                transient=(ApiException, HTTPError, OSError),
                transient_event="watch_failed",
                min_silence=IDLE_WATCH_SECONDS,
                context={"kind": resource.kind},
            ).start()
            for resource in self.resources
        ]
