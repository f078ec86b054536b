"""A one-shot command converts EndpointSlices as it reads them: the same state, and the same
warnings in the same order, as converting them after the whole read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from kproxy.inspect.inputs import build_state, node_and_config, read_manifests
from kproxy.watch.manifests import Manifests, load_manifests

MANIFESTS = """\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec: {clusterIP: 10.0.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-1, namespace: ns, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.1.0.1]
- addresses: [127.0.0.1]
- addresses: [10.1.0.2]
  conditions: {ready: "yes"}
- addresses: [10.1.0.3]
  hints: {forZones: [{name: z1}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: "Bad_Name", namespace: ns, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: ns}
spec: {clusterIP: 10.0.0.300, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSliceList
items:
- metadata: {name: a-2, namespace: ns, labels: {kubernetes.io/service-name: a}}
  addressType: IPv4
  ports: [{name: http, port: 8080}]
  endpoints: [{addresses: [10.1.0.9], nodeName: node-a}]
- metadata: {name: a-2, namespace: ns, labels: {kubernetes.io/service-name: a}}
  addressType: IPv4
  ports: [{name: http, port: 8080}]
  endpoints: [{addresses: [10.1.0.4], nodeName: node-a}]
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: bad}
spec: {cidrs: [10.0.0.0/33]}
"""
SECOND_FILE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: c-1, namespace: ns, labels: {kubernetes.io/service-name: c}}
addressType: IPv6
endpoints: [{addresses: [10.1.0.5]}, {addresses: ["fd00::5"]}]
"""


def run(path: Path, convert_slices: bool) -> tuple[list[dict[str, Any]], Any, Any]:
    with capture_logs() as logs:
        # As the commands call it (converting as read), or converting after the read.
        if convert_slices:
            manifests = read_manifests(str(path))
        else:
            manifests = read_manifests(str(path), convert_slices=False)
        _, config = node_and_config(manifests, None, "node-a")
        state = build_state(manifests, config)
    return logs, state.services_map(), state.endpoints_map()


@pytest.fixture
def manifests_dir(tmp_path: Path) -> Path:
    (tmp_path / "a.yaml").write_text(MANIFESTS)
    (tmp_path / "b.yaml").write_text(SECOND_FILE)
    return tmp_path


def test_converted_as_read_gives_the_same_state_and_warnings(manifests_dir: Path) -> None:
    streamed, after = run(manifests_dir, True), run(manifests_dir, False)
    assert streamed == after


def test_the_warnings_keep_their_order(manifests_dir: Path) -> None:
    logs, _, endpoints = run(manifests_dir, True)
    seen = [(e["event"], e.get("object"), e.get("field")) for e in logs]
    assert seen == [
        ("manifest_document_ignored", None, None),
        ("object_skipped", "Service ns/b", "spec.clusterIP"),
        ("object_skipped", "EndpointSlice ns/a-1", "endpoints[1].addresses[0]"),
        ("object_skipped", "EndpointSlice ns/a-1", "endpoints[2].conditions.ready"),
        ("object_skipped", "EndpointSlice ns/'Bad_Name'", "metadata.name"),
        ("object_skipped", "EndpointSlice ns/c-1", "endpoints[0].addresses[0]"),
        ("object_skipped", "ServiceCIDR bad", "spec.cidrs[0]"),
    ]
    ips = sorted(ep.ip for eps in endpoints.values() for ep in eps)
    assert ips == ["10.1.0.1", "10.1.0.3", "10.1.0.4"]


def test_slices_alone_are_not_empty_manifests(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(SECOND_FILE)
    with capture_logs() as logs:
        read_manifests(str(tmp_path))
    assert [e["event"] for e in logs] == []


def test_converted_manifests_are_not_merged(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(SECOND_FILE)
    with pytest.raises(ValueError, match="cannot be merged"):
        Manifests().extend(load_manifests(tmp_path, convert_slices=True))
