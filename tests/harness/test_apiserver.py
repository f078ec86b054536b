"""The test API server (integration/apiserver.py) driven by the real `kubernetes` client over HTTP
on loopback: lists, selectors, watch streams with bookmarks, 410 Expired, outages on the same port,
and the standalone process. No root needed."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.informer import SharedInformer

from integration.apiserver import (
    ApiError,
    ApiServer,
    Selector,
    parse_field_selector,
    parse_label_selector,
    running_apiserver,
)

ROOT = Path(__file__).resolve().parents[2]
KUBE_PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
Event = dict[str, Any]


def service(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }


def endpoint_slice(name: str, service_name: str, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["10.244.1.5"],
                "conditions": {"ready": ready, "serving": True, "terminating": False},
                "nodeName": "node-a",
            }
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.31.0.2"}]},
    }


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with running_apiserver(bookmark_interval=0.2) as api_server:
        yield api_server


@pytest.fixture
def core(server: ApiServer) -> client.CoreV1Api:
    return client.CoreV1Api(server.api_client())


@pytest.fixture
def discovery(server: ApiServer) -> client.DiscoveryV1Api:
    return client.DiscoveryV1Api(server.api_client())


def in_thread(server: ApiServer, changes: Callable[[], None], kind: str = "Service") -> None:
    """Run changes in another thread once a watch of this kind is open."""

    def run() -> None:
        assert server.wait_for_watches(1, kind)
        changes()

    threading.Thread(target=run, daemon=True).start()


def collect(
    stream: Iterator[Event], w: watch.Watch, until: Callable[[list[Event]], bool]
) -> list[Event]:
    """Events from a watch stream until `until(events)` holds (then stop) or the stream ends."""
    events: list[Event] = []
    for event in stream:
        events.append(event)
        if until(events):
            w.stop()
    return events


def names(items: list[Any]) -> list[str]:
    return [item.metadata.name for item in items]


# --------------------------------------------------------------------------------------------
# Lists and writes


def test_list_returns_created_objects_with_resource_versions(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create("Service", service("web"))
    core.create_namespaced_service("kube-system", service("kube-dns", namespace="kube-system"))

    listed = core.list_service_for_all_namespaces()
    assert isinstance(listed, client.V1ServiceList)
    assert [(s.metadata.namespace, s.metadata.name) for s in listed.items] == [
        ("default", "web"),
        ("kube-system", "kube-dns"),
    ]
    assert listed.metadata.resource_version == server.resource_version == "2"
    assert [s.metadata.resource_version for s in listed.items] == ["1", "2"]
    assert all(s.metadata.uid and s.metadata.creation_timestamp for s in listed.items)
    assert listed.items[0].spec.ports[0].target_port == 8080
    assert names(core.list_namespaced_service("kube-system").items) == ["kube-dns"]
    assert core.read_namespaced_service("web", "default").spec.cluster_ip == "10.96.0.10"
    assert server.count("list", "Service") == 2 and server.count("create", "Service") == 1


def test_writes_through_the_client_follow_the_api_semantics(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    created = core.create_namespaced_service("default", service("web"))
    assert created.metadata.resource_version == "1"
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_service("default", service("web"))
    assert exists.value.status == 409 and "AlreadyExists" in str(exists.value.body)
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_service("nope", "default")
    assert missing.value.status == 404

    created.spec.type = "NodePort"
    replaced = core.replace_namespaced_service("web", "default", created)
    assert replaced.metadata.resource_version == "2"
    assert replaced.metadata.uid == created.metadata.uid
    # A stale resourceVersion is a conflict; an unchanged object is a no-op.
    with pytest.raises(ApiException) as stale:
        core.replace_namespaced_service("web", "default", created)
    assert stale.value.status == 409
    again = core.replace_namespaced_service("web", "default", replaced)
    assert again.metadata.resource_version == "2" == server.resource_version

    deleted = core.delete_namespaced_service("web", "default")
    assert deleted.metadata.name == "web" and deleted.metadata.resource_version == "3"
    assert core.list_service_for_all_namespaces().items == []
    with pytest.raises(ApiException) as gone:
        core.delete_namespaced_service("web", "default")
    assert gone.value.status == 404


def test_kube_proxy_label_selector(server: ApiServer, core: client.CoreV1Api) -> None:
    server.create("Service", service("plain"))
    server.create(
        "Service", service("other-proxy", **{"service.kubernetes.io/service-proxy-name": "x"})
    )
    server.create("Service", service("headless", **{"service.kubernetes.io/headless": ""}))
    server.create("Service", service("labelled", app="web"))

    selected = core.list_service_for_all_namespaces(label_selector=KUBE_PROXY_SELECTOR)
    assert names(selected.items) == ["labelled", "plain"]
    assert names(core.list_service_for_all_namespaces(label_selector="app=web").items) == [
        "labelled"
    ]
    assert names(core.list_service_for_all_namespaces(label_selector="app!=web").items) == [
        "headless",
        "other-proxy",
        "plain",
    ]
    with pytest.raises(ApiException) as bad:
        core.list_service_for_all_namespaces(label_selector="a=b=c")
    assert bad.value.status == 400


@pytest.mark.parametrize(
    ("selector", "matching"),
    [
        ("", {"none", "a", "ab", "b2"}),
        ("a", {"a", "ab"}),
        ("!a", {"none", "b2"}),
        ("a=1", {"a", "ab"}),
        ("a==1", {"a", "ab"}),
        ("b!=1", {"none", "a", "b2"}),
        ("a,b", {"ab"}),
        ("a=1,!b", {"a"}),
        ("b in (1, 2)", {"ab", "b2"}),
        ("b notin (1),!a", {"none", "b2"}),
        ("example.com/tier", set()),
    ],
)
def test_label_selector_forms(selector: str, matching: set[str]) -> None:
    objects = {
        "none": {},
        "a": {"a": "1"},
        "ab": {"a": "1", "b": "1"},
        "b2": {"b": "2"},
    }
    parsed = Selector(labels=parse_label_selector(selector))
    assert {
        n for n, labels in objects.items() if parsed.matches({"metadata": {"labels": labels}})
    } == (matching)


@pytest.mark.parametrize("selector", ["a in (1", "=1", "a=b=c", "a>1"])
def test_malformed_label_selectors_are_bad_requests(selector: str) -> None:
    with pytest.raises(ApiError) as error:
        parse_label_selector(selector)
    assert error.value.code == 400


def test_field_selectors() -> None:
    obj = {"metadata": {"name": "n1", "namespace": "default"}}
    assert Selector(fields=parse_field_selector("metadata.name=n1")).matches(obj)
    assert not Selector(fields=parse_field_selector("metadata.name!=n1")).matches(obj)
    both = parse_field_selector("metadata.namespace==default,metadata.name=n2")
    assert not Selector(fields=both).matches(obj)
    with pytest.raises(ApiError, match="not supported"):
        parse_field_selector("spec.nodeName=n1")


def test_paging_with_limit_and_continue(server: ApiServer, core: client.CoreV1Api) -> None:
    for i in range(5):
        server.create("Service", service(f"s{i}"))
    first = core.list_service_for_all_namespaces(limit=2)
    assert names(first.items) == ["s0", "s1"] and first.metadata.remaining_item_count == 3
    server.create("Service", service("s9"))  # not in the snapshot being paged
    second = core.list_service_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    assert names(second.items) == ["s2", "s3"]
    assert second.metadata.resource_version == first.metadata.resource_version == "5"
    third = core.list_service_for_all_namespaces(limit=2, _continue=second.metadata._continue)
    assert names(third.items) == ["s4"] and not third.metadata._continue

    pending = core.list_service_for_all_namespaces(limit=2).metadata._continue
    server.compact()
    with pytest.raises(ApiException) as expired:
        core.list_service_for_all_namespaces(limit=2, _continue=pending)
    assert expired.value.status == 410


def test_node_field_selector(server: ApiServer, core: client.CoreV1Api) -> None:
    for name in ("node-a", "node-b", "node-c"):
        server.create("Node", node(name))
    selected = core.list_node(field_selector="metadata.name=node-b")
    assert names(selected.items) == ["node-b"]
    assert selected.items[0].status.addresses[0].address == "172.31.0.2"
    assert core.read_node("node-c").metadata.labels == {"kubernetes.io/hostname": "node-c"}

    def changes() -> None:
        server.update("Node", {**node("node-a"), "spec": {"podCIDR": "10.244.0.0/24"}})
        server.update("Node", {**node("node-b"), "spec": {"podCIDR": "10.244.1.0/24"}})

    in_thread(server, changes, "Node")
    w = watch.Watch()
    events = collect(
        w.stream(
            core.list_node,
            field_selector="metadata.name=node-b",
            resource_version=selected.metadata.resource_version,
            timeout_seconds=2,
        ),
        w,
        lambda events: bool(events),
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("MODIFIED", "node-b")]
    assert events[0]["object"].spec.pod_cidr == "10.244.1.0/24"
    assert core.delete_node("node-a")["status"] == "Success"
    assert names(core.list_node().items) == ["node-b", "node-c"]


def test_endpoint_slice_models_deserialize(
    server: ApiServer, discovery: client.DiscoveryV1Api
) -> None:
    model = client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(
            name="web-abc12", labels={"kubernetes.io/service-name": "web"}
        ),
        address_type="IPv4",
        endpoints=[
            client.V1Endpoint(
                addresses=["10.244.1.5"],
                conditions=client.V1EndpointConditions(ready=True, serving=True),
                node_name="node-a",
            )
        ],
        ports=[client.DiscoveryV1EndpointPort(name="http", port=8080, protocol="TCP")],
    )
    discovery.create_namespaced_endpoint_slice("default", model)
    server.create("EndpointSlice", endpoint_slice("other-xyz", "other", ready=False))

    listed = discovery.list_endpoint_slice_for_all_namespaces(
        label_selector="kubernetes.io/service-name=web"
    )
    assert isinstance(listed, client.V1EndpointSliceList)
    [eps] = listed.items
    assert eps.address_type == "IPv4"
    assert eps.endpoints[0].conditions.ready is True
    assert eps.endpoints[0].node_name == "node-a"
    assert eps.ports[0].port == 8080
    other = discovery.read_namespaced_endpoint_slice("other-xyz", "default")
    assert other.endpoints[0].conditions.ready is False
    assert names(discovery.list_namespaced_endpoint_slice("default").items) == [
        "other-xyz",
        "web-abc12",
    ]


def test_discovery_documents(server: ApiServer) -> None:
    api_client = server.api_client()
    assert client.VersionApi(api_client).get_code().git_version.startswith("v1.")
    assert client.CoreApi(api_client).get_api_versions().versions == ["v1"]
    core_resources = client.CoreV1Api(api_client).get_api_resources()
    assert {r.name for r in core_resources.resources} == {"services", "nodes"}
    groups = client.ApisApi(api_client).get_api_versions().groups
    assert [g.preferred_version.group_version for g in groups] == ["discovery.k8s.io/v1"]
    slices = client.DiscoveryV1Api(api_client).get_api_resources()
    assert [r.kind for r in slices.resources] == ["EndpointSlice"]


def test_injected_errors(server: ApiServer, core: client.CoreV1Api) -> None:
    server.inject_error("list", "Service", code=503)
    with pytest.raises(ApiException) as error:
        core.list_service_for_all_namespaces()
    assert error.value.status == 503
    core.list_service_for_all_namespaces()
    assert server.count("list", "Service") == 2


# --------------------------------------------------------------------------------------------
# Watches


def test_watch_streams_changes_made_after_the_list_and_bookmarks(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create("Service", service("web"))
    rv = core.list_service_for_all_namespaces().metadata.resource_version

    def changes() -> None:
        server.create("Service", service("api"))
        server.update("Service", {**service("api"), "spec": {"clusterIP": "10.96.0.11"}})
        server.delete("Service", "api", "default")

    in_thread(server, changes)
    w = watch.Watch()
    stream = w.stream(
        core.list_service_for_all_namespaces,
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=2,
    )
    events = collect(stream, w, lambda events: events[-1]["type"] == "BOOKMARK")
    changes_seen = [(e["type"], e["object"].metadata.name) for e in events[:-1]]
    assert changes_seen == [("ADDED", "api"), ("MODIFIED", "api"), ("DELETED", "api")]
    assert [e["object"].metadata.resource_version for e in events[:-1]] == ["2", "3", "4"]
    assert isinstance(events[1]["object"], client.V1Service)
    assert events[1]["object"].spec.cluster_ip == "10.96.0.11"
    bookmark = events[-1]["raw_object"]
    assert bookmark == {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "4"}}
    assert w.resource_version == "4"
    # The client closed the stream: the server notices and drops the watch.
    assert server.wait_for(lambda: server.active_watches() == 0, timeout=2)


def test_watch_ends_after_timeout_seconds(server: ApiServer, core: client.CoreV1Api) -> None:
    start = time.monotonic()
    events = list(
        watch.Watch().stream(
            core.list_service_for_all_namespaces,
            resource_version="0",
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        )
    )
    assert 0.9 < time.monotonic() - start < 5
    assert len(events) >= 3 and {e["type"] for e in events} == {"BOOKMARK"}
    assert server.count("watch", "Service") == 1


def test_watch_replays_history_and_follows_selectors(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create("Service", service("web"))
    rv = server.resource_version
    server.create("Service", service("mine", **{"service.kubernetes.io/service-proxy-name": "x"}))
    server.update("Service", service("web", app="web"))
    server.update("Service", service("mine"))  # now handled by kube-proxy: appears as ADDED
    server.update("Service", service("web", **{"service.kubernetes.io/headless": ""}))
    w = watch.Watch()
    events = collect(
        w.stream(
            core.list_service_for_all_namespaces,
            resource_version=rv,
            label_selector=KUBE_PROXY_SELECTOR,
            timeout_seconds=1,
        ),
        w,
        lambda events: len(events) == 3,
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("MODIFIED", "web"),
        ("ADDED", "mine"),
        ("DELETED", "web"),  # left the selection
    ]


def test_watch_without_resource_version_starts_with_the_current_objects(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create("Service", service("a"))
    server.create("Service", service("b"))
    w = watch.Watch()
    events = collect(
        w.stream(core.list_service_for_all_namespaces, timeout_seconds=1),
        w,
        lambda events: len(events) == 2,
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]

    w = watch.Watch()
    events = collect(
        w.stream(
            core.list_service_for_all_namespaces,
            send_initial_events=True,
            resource_version_match="NotOlderThan",
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        ),
        w,
        lambda events: events[-1]["type"] == "BOOKMARK",
    )
    assert [e["type"] for e in events] == ["ADDED", "ADDED", "BOOKMARK"]
    annotations = events[-1]["raw_object"]["metadata"]["annotations"]
    assert annotations == {"k8s.io/initial-events-end": "true"}


def test_watch_from_a_compacted_resource_version_raises_410(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create("Service", service("web"))
    old_rv = core.list_service_for_all_namespaces().metadata.resource_version
    server.update("Service", service("web", app="web"))
    server.compact()

    # Without timeout_seconds the client retries once from the same version, then raises.
    with pytest.raises(ApiException) as expired:
        list(watch.Watch().stream(core.list_service_for_all_namespaces, resource_version=old_rv))
    assert expired.value.status == 410
    assert "too old resource version: 1 (2)" in str(expired.value.reason)
    assert server.count("watch", "Service") == 2
    # With timeout_seconds it does not retry.
    with pytest.raises(ApiException) as again:
        list(
            watch.Watch().stream(
                core.list_service_for_all_namespaces, resource_version=old_rv, timeout_seconds=1
            )
        )
    assert again.value.status == 410 and server.count("watch", "Service") == 3
    # The current version is still fine.
    current = core.list_service_for_all_namespaces().metadata.resource_version
    stream = watch.Watch().stream(
        core.list_service_for_all_namespaces, resource_version=current, timeout_seconds=1
    )
    assert list(stream) == []


def test_a_forced_410_is_retried_once_by_the_client(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    rv = core.list_service_for_all_namespaces().metadata.resource_version
    server.force_410_next_watch("Service")
    in_thread(server, lambda: server.create("Service", service("web")))
    w = watch.Watch()
    events = collect(
        w.stream(core.list_service_for_all_namespaces, resource_version=rv),
        w,
        lambda events: bool(events),
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "web")]
    assert server.count("watch", "Service") == 2


def test_ended_watches_resume_from_the_last_version(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    rv = core.list_service_for_all_namespaces().metadata.resource_version

    def changes() -> None:
        server.create("Service", service("a"))
        time.sleep(0.1)
        server.end_watches()
        server.create("Service", service("b"))  # made while the client reconnects

    in_thread(server, changes)
    w = watch.Watch()
    events = collect(
        w.stream(core.list_service_for_all_namespaces, resource_version=rv),
        w,
        lambda events: len(events) == 2,
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]
    assert server.count("watch", "Service") == 2
    assert "resourceVersion=1&" in server.requests[-1][1]  # the version of the last event


def test_shared_informer_relists_after_410(server: ApiServer, core: client.CoreV1Api) -> None:
    server.create("Service", service("a"))
    seen: queue.Queue[tuple[str, str]] = queue.Queue()
    informer = SharedInformer(core.list_service_for_all_namespaces)
    for kind in ("ADDED", "MODIFIED", "DELETED"):
        informer.add_event_handler(kind, lambda obj, k=kind: seen.put((k, obj.metadata.name)))
    informer.start()
    try:
        assert seen.get(timeout=5) == ("ADDED", "a")
        assert server.wait_for_watches(1, "Service")
        server.delete("Service", "a")
        assert seen.get(timeout=5) == ("DELETED", "a")
        # The watch ends, and both the resume and the client's retry get 410: the informer
        # lists again, then watches from the new list's version.
        server.force_410_next_watch("Service", times=2)
        server.end_watches()
        assert server.wait_for_count("list", "Service", 2)
        assert server.wait_for_count("watch", "Service", 4)
        server.create("Service", service("b"))
        assert seen.get(timeout=5) == ("ADDED", "b")
    finally:
        informer.stop()
    assert server.count("list", "Service") == 2
    assert seen.empty()


# --------------------------------------------------------------------------------------------
# Outages


def test_stop_and_start_on_the_same_port(server: ApiServer, core: client.CoreV1Api) -> None:
    server.create("Service", service("web"))
    url = server.url
    rv = core.list_service_for_all_namespaces().metadata.resource_version
    broken: queue.Queue[BaseException | None] = queue.Queue()

    def watch_until_broken() -> None:
        try:
            for _ in watch.Watch().stream(
                core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30
            ):
                pass
            broken.put(None)
        except BaseException as exc:
            broken.put(exc)

    threading.Thread(target=watch_until_broken, daemon=True).start()
    assert server.wait_for_watches(1, "Service")
    server.stop()
    assert isinstance(broken.get(timeout=5), urllib3.exceptions.HTTPError)
    assert server.active_watches() == 0
    with pytest.raises(urllib3.exceptions.HTTPError):
        core.list_service_for_all_namespaces()
    server.create("Service", service("api"))  # the state outlives the outage

    server.start()
    assert server.url == url
    listed = core.list_service_for_all_namespaces()
    assert names(listed.items) == ["api", "web"]
    assert listed.metadata.resource_version == "2"


# --------------------------------------------------------------------------------------------
# Standalone process


def test_standalone_process_serves_manifests(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    listed_services = {"apiVersion": "v1", "kind": "List", "items": [service("web")]}
    (manifests / "services.yaml").write_text(yaml.safe_dump(listed_services))
    slices = [endpoint_slice("web-1", "web"), node("node-a"), {"kind": "ConfigMap"}]
    (manifests / "more.yaml").write_text(yaml.safe_dump_all(slices))
    kubeconfig = tmp_path / "kubeconfig"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "integration.apiserver",
            "--port",
            "0",
            "--manifests",
            str(manifests),
            "--kubeconfig",
            str(kubeconfig),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        api_client = config.new_client_from_config(config_file=str(kubeconfig))
        assert api_client.configuration.host == url
        core = client.CoreV1Api(api_client)
        assert names(core.list_service_for_all_namespaces().items) == ["web"]
        assert names(core.list_node().items) == ["node-a"]
        slice_list = client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces()
        assert slice_list.items[0].endpoints[0].conditions.ready is True
        assert slice_list.metadata.resource_version == "3"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "ConfigMap" in stderr
