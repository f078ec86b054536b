"""Each kind's mutation touches only its kind, and a sink counts what it skipped under the kind of
the object skipped, also when one manifest file changes several kinds at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.kinds import Kind
from kproxy.model.service import NamespacedName
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import combine, remove, replace_all, set_node, set_objects, upsert
from kproxy.sync.loop import StateBox
from kproxy.watch.files import ManifestSource

WEB = NamespacedName("default", "web")
WEB_SLICE = NamespacedName("default", "web-1")


def service(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]},
    }


def endpoint_slice(name: str, ips: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


def node(name: str, zone: str) -> dict[str, Any]:
    labels = {"topology.kubernetes.io/zone": zone}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


@pytest.mark.parametrize("kind", [Kind.NODE, "Node", "ADDED", "Services"])
def test_keyed_mutations_refuse_what_is_not_a_service_or_an_endpoint_slice(kind: Any) -> None:
    obj = service("web", "10.96.0.5")
    for build in (
        lambda: upsert(kind, obj),
        lambda: remove(kind, obj),
        lambda: replace_all(kind, [obj]),
        lambda: set_objects(kind, {WEB: obj}),
    ):
        with pytest.raises(ValueError, match="not Service or EndpointSlice"):
            build()


def test_a_service_mutation_touches_only_services() -> None:
    state = ClusterState()
    replace_all(Kind.ENDPOINT_SLICE, [endpoint_slice("web", ["10.0.0.1"])])(state)
    mutation = upsert(Kind.SERVICE, service("web", "10.96.0.5"))
    assert mutation.kinds == {Kind.SERVICE}
    assert mutation(state) == []
    assert state.service_keys() == {WEB} and state.slice_keys() == {WEB_SLICE}
    replace_all(Kind.SERVICE, [])(state)
    assert state.service_keys() == set() and state.slice_keys() == {WEB_SLICE}


def test_an_endpoint_slice_mutation_touches_only_endpoint_slices() -> None:
    state = ClusterState()
    upsert(Kind.SERVICE, service("web", "10.96.0.5"))(state)
    mutation = upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.1"]))
    assert mutation.kinds == {Kind.ENDPOINT_SLICE}
    mutation(state)
    assert state.slice_keys() == {WEB_SLICE}
    remove(Kind.ENDPOINT_SLICE, endpoint_slice("web", []))(state)
    assert state.slice_keys() == set() and state.service_keys() == {WEB}


def test_a_node_mutation_touches_only_the_node() -> None:
    state = ClusterState()
    upsert(Kind.SERVICE, service("web", "10.96.0.5"))(state)
    mutation = set_node("node-a", [node("node-a", "z1")])
    assert mutation.kinds == {Kind.NODE}
    mutation(state)
    assert state.node is not None and state.node.labels["topology.kubernetes.io/zone"] == "z1"
    assert state.service_keys() == {WEB}


def test_skipped_objects_are_returned_with_their_own_kind() -> None:
    mutation = combine(
        upsert(Kind.SERVICE, service("bad", "10.96.0.300")),
        upsert(Kind.ENDPOINT_SLICE, endpoint_slice("web", ["10.0.0.300"])),
    )
    skipped = mutation.apply_to(ClusterState())
    assert [kind for kind, _ in skipped] == [Kind.SERVICE, Kind.ENDPOINT_SLICE]


def sample(metrics: ProxyMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_a_file_change_touching_several_kinds_counts_each_under_its_kind(tmp_path: Path) -> None:
    metrics = ProxyMetrics()
    box = StateBox("node-a", ProxyHealth(timeout=60), metrics)
    source = ManifestSource(str(tmp_path), "node-a")
    docs = [
        node("node-a", "z1"),
        service("web", "10.96.0.5"),
        service("bad", "10.96.0.300"),
        endpoint_slice("web", ["10.0.0.1", "10.0.0.300"]),
    ]
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all(docs))
    source.poll(box)
    skipped = "kproxy_invalid_objects_skipped_total"
    assert sample(metrics, skipped, {"kind": "Service"}) == 1
    assert sample(metrics, skipped, {"kind": "EndpointSlice"}) == 1
    assert sample(metrics, skipped, {"kind": "Node"}) == 0
    assert sample(metrics, "kubeproxy_sync_proxy_rules_service_changes_total") == 1
    assert sample(metrics, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1
    assert box.state.service_keys() == {WEB} and box.state.slice_keys() == {WEB_SLICE}
