"""The API source: list then watch Services, EndpointSlices and this node's Node with the official
`kubernetes` client, as kube-proxy's informers do.

Each resource has a reflector thread: list (its resourceVersion starts the watch), then watch with
bookmarks; a 410 Gone means the history is compacted, so it lists again; any other error waits a
capped, jittered, exponential backoff and retries. While the API server is away nothing is
reported, so the rules in the kernel stay as they are.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from kproxy.errors import ConfigError
from kproxy.state.ingest import Mutation, remove, replace_all, set_node, upsert
from kproxy.watch.sink import ENDPOINT_SLICE, NODE, SERVICE, Sink

log = structlog.get_logger("kproxy.watch")

# Upstream's informers skip objects meant for another proxy, and headless services.
PROXY_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
WATCH_TIMEOUT_SECONDS = 300


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """In-cluster credentials inside a pod, else the kubeconfig (flag, KUBECONFIG, ~/.kube)."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    try:
        api: client.ApiClient = config.new_client_from_config(config_file=kubeconfig)
        return api
    except (config.ConfigException, OSError) as exc:
        where = kubeconfig or "KUBECONFIG / ~/.kube/config"
        raise ConfigError(f"no usable Kubernetes credentials in {where}: {exc}") from exc


@dataclass
class Backoff:
    """Capped exponential backoff with jitter."""

    initial: float = 0.5
    cap: float = 30.0
    current: float = 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.initial)
        return self.current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.current = 0.0


@dataclass
class Resource:
    kind: str
    list_fn: Callable[..., Any]
    selectors: dict[str, str]
    on_list: Callable[[list[dict[str, Any]]], Mutation]
    on_event: Callable[[str, dict[str, Any]], Mutation]


class Reflector:
    """List and watch one resource, reporting into the sink, until stopped."""

    def __init__(self, resource: Resource, sink: Sink, stop: threading.Event) -> None:
        self.resource = resource
        self.sink = sink
        self.stop = stop
        self.backoff = Backoff()

    def run(self) -> None:
        kind = self.resource.kind
        while not self.stop.is_set():
            try:
                version = self._list()
                self._watch(version)
            except ApiException as exc:
                if exc.status == 410:
                    log.info("watch_expired", kind=kind)
                    continue  # history compacted: list again
                self._wait(f"API error {exc.status}: {exc.reason}")
            except Exception as exc:  # connection refused, reset, timeouts: keep trying
                self._wait(f"{type(exc).__name__}: {exc}")

    def _wait(self, error: str) -> None:
        delay = self.backoff.next()
        log.warning("watch_failed", kind=self.resource.kind, error=error, retry_in=round(delay, 2))
        self.stop.wait(delay)

    def _list(self) -> str:
        response = self.resource.list_fn(**self.resource.selectors, _preload_content=False)
        body = json.loads(response.data)
        self.sink.apply(self.resource.kind, self.resource.on_list(body.get("items") or []))
        self.sink.synced(self.resource.kind)
        self.backoff.reset()
        version: str = body["metadata"]["resourceVersion"]
        return version

    def _watch(self, version: str) -> None:
        """Watch from `version`; returns when the server ends the stream (then the caller
        lists again, which also catches anything a bookmark-less gap could have lost)."""
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
            if self.stop.is_set():
                w.stop()
                return
            kind, raw = event["type"], event["raw_object"]
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.sink.apply(self.resource.kind, self.resource.on_event(kind, raw))
            self.backoff.reset()


def _object_event(kind: str) -> Callable[[str, dict[str, Any]], Mutation]:
    def to_mutation(event: str, obj: dict[str, Any]) -> Mutation:
        return remove(kind, obj) if event == "DELETED" else upsert(kind, obj)

    return to_mutation


class ApiSource:
    """Reflectors for Services, EndpointSlices and this node's Node."""

    def __init__(self, api: client.ApiClient, node_name: str) -> None:
        core = client.CoreV1Api(api)
        discovery = client.DiscoveryV1Api(api)
        node_selector = {"field_selector": f"metadata.name={node_name}"}
        self.resources = [
            Resource(
                SERVICE,
                core.list_service_for_all_namespaces,
                {"label_selector": PROXY_LABEL_SELECTOR},
                lambda items: replace_all(SERVICE, items),
                _object_event(SERVICE),
            ),
            Resource(
                ENDPOINT_SLICE,
                discovery.list_endpoint_slice_for_all_namespaces,
                {"label_selector": PROXY_LABEL_SELECTOR},
                lambda items: replace_all(ENDPOINT_SLICE, items),
                _object_event(ENDPOINT_SLICE),
            ),
            Resource(
                NODE,
                core.list_node,
                node_selector,
                lambda items: set_node(node_name, items),
                lambda event, obj: set_node(node_name, [] if event == "DELETED" else [obj]),
            ),
        ]

    def start(self, sink: Sink, stop: threading.Event) -> list[threading.Thread]:
        threads = []
        for resource in self.resources:
            reflector = Reflector(resource, sink, stop)
            thread = threading.Thread(
                target=reflector.run, daemon=True, name=f"watch-{resource.kind}"
            )
            thread.start()
            threads.append(thread)
        return threads
