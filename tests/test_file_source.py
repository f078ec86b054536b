"""The manifest file source (`kproxy run --manifests`) against a recording sink: it survives
anything a file or the sink throws at it, re-reads only the files that changed, keeps the last
good objects of a file that fails to parse, and removes the objects of a deleted file."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from structlog.testing import capture_logs

import kproxy.watch.manifests as manifests_module
from kproxy.errors import InvalidObjectError
from kproxy.model.service import NamespacedName
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import Mutation
from kproxy.watch.files import ManifestSource

T = TypeVar("T")
POLL = 0.02
PATIENCE = 10.0


class RecordingSink:
    """A Sink over a bare ClusterState; its first `failures` applies raise, as a broken sink
    (or anything else below the source) would."""

    def __init__(self, failures: int = 0) -> None:
        self.state = ClusterState()
        self.lock = threading.Lock()
        self.failures = failures
        self.errors: list[InvalidObjectError] = []
        self.synced_kinds: set[str] = set()
        self.applies = 0

    def apply(self, mutation: Mutation) -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("sink exploded")
            self.errors += mutation(self.state)
            self.applies += 1

    def synced(self, kind: str) -> None:
        with self.lock:
            self.synced_kinds.add(kind)

    def cluster_ips(self) -> dict[str, str]:
        with self.lock:
            return {
                spn.service.name: sp.cluster_ips[0] for spn, sp in self.state.services_map().items()
            }

    def endpoints(self, name: str) -> list[str]:
        with self.lock:
            return sorted(
                ep.ip
                for spn, eps in self.state.endpoints_map().items()
                if spn.service.name == name
                for ep in eps
            )


def service(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]},
    }


def endpoint_slice(name: str, ips: list[str], conditions: Any = None) -> dict[str, Any]:
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
        "endpoints": [
            {"addresses": [ip], "conditions": conditions or {"ready": True}} for ip in ips
        ],
    }


def write(path: Path, *docs: dict[str, Any]) -> None:
    # Through a temporary name and a rename, as editors and ConfigMap updates do, so a poll
    # never reads half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.rename(path)


def wait_for(predicate: Callable[[], T], timeout: float = PATIENCE) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def start(path: Path, sink: RecordingSink, stop: threading.Event) -> None:
    ManifestSource(str(path), "node-a", poll_seconds=POLL).start(sink, stop)


def test_source_keeps_running_after_the_sink_raises(tmp_path: Path, stop: threading.Event) -> None:
    write(tmp_path / "web.yaml", service("web", "10.96.0.1"))
    sink = RecordingSink(failures=3)
    start(tmp_path, sink, stop)
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.1"})
    write(tmp_path / "web.yaml", service("web", "10.96.0.2"))
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.2"})


def test_source_keeps_running_after_a_slice_that_crashed_the_converter(
    tmp_path: Path, stop: threading.Event
) -> None:
    write(tmp_path / "web.yaml", service("web", "10.96.0.1"), endpoint_slice("web", ["10.0.0.1"]))
    sink = RecordingSink()
    start(tmp_path, sink, stop)
    assert wait_for(lambda: sink.endpoints("web") == ["10.0.0.1"])
    # `conditions: "true"` (a string where a mapping belongs) made the converter raise.
    write(tmp_path / "bad.yaml", endpoint_slice("bad", ["10.0.0.9"], conditions="true"))
    time.sleep(10 * POLL)
    write(tmp_path / "web.yaml", service("web", "10.96.0.1"), endpoint_slice("web", ["10.0.0.2"]))
    assert wait_for(lambda: sink.endpoints("web") == ["10.0.0.2"])


def test_a_file_that_fails_to_parse_keeps_its_objects_and_other_files_still_apply(
    tmp_path: Path, stop: threading.Event
) -> None:
    write(tmp_path / "a.yaml", service("a", "10.96.0.1"))
    write(tmp_path / "b.yaml", service("b", "10.96.0.2"))
    sink = RecordingSink()
    start(tmp_path, sink, stop)
    assert wait_for(lambda: len(sink.cluster_ips()) == 2)
    with capture_logs() as logs:
        (tmp_path / "b.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: [\n")
        time.sleep(10 * POLL)
        write(tmp_path / "a.yaml", service("a", "10.96.0.3"))
        assert wait_for(lambda: sink.cluster_ips() == {"a": "10.96.0.3", "b": "10.96.0.2"})
    named = [e for e in logs if str(e.get("file", "")).endswith("b.yaml") and e.get("line")]
    assert named and named[0]["log_level"] == "error", logs
    assert named[0]["line"] == 4


def test_only_the_changed_file_is_parsed(
    tmp_path: Path, stop: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):
        write(tmp_path / f"svc-{i}.yaml", service(f"svc-{i}", f"10.96.1.{i}"))
    parsed: list[str] = []
    real = manifests_module._documents

    def counting(path: Path) -> Iterator[Any]:
        parsed.append(path.name)
        return real(path)

    monkeypatch.setattr(manifests_module, "_documents", counting)
    sink = RecordingSink()
    start(tmp_path, sink, stop)
    assert wait_for(lambda: len(sink.cluster_ips()) == 20)
    time.sleep(10 * POLL)
    del parsed[:]
    with sink.lock:
        sink.state.take_changes()
    write(tmp_path / "svc-7.yaml", service("svc-7", "10.96.2.7"))
    assert wait_for(lambda: sink.cluster_ips()["svc-7"] == "10.96.2.7")
    time.sleep(10 * POLL)
    assert parsed == ["svc-7.yaml"]
    with sink.lock:
        assert sink.state.take_changes() == {NamespacedName("default", "svc-7")}


def test_objects_removed_from_a_file_or_with_a_deleted_file_disappear(
    tmp_path: Path, stop: threading.Event
) -> None:
    write(tmp_path / "a.yaml", service("a1", "10.96.0.1"), service("a2", "10.96.0.2"))
    write(tmp_path / "b.yaml", service("b", "10.96.0.3"), endpoint_slice("b", ["10.0.0.3"]))
    sink = RecordingSink()
    start(tmp_path, sink, stop)
    assert wait_for(lambda: len(sink.cluster_ips()) == 3 and sink.endpoints("b"))
    write(tmp_path / "a.yaml", service("a1", "10.96.0.1"))
    assert wait_for(lambda: set(sink.cluster_ips()) == {"a1", "b"})
    (tmp_path / "b.yaml").unlink()
    assert wait_for(lambda: set(sink.cluster_ips()) == {"a1"} and not sink.endpoints("b"))


def test_an_object_in_two_files_keeps_the_last_files_copy_until_both_drop_it(
    tmp_path: Path, stop: threading.Event
) -> None:
    write(tmp_path / "a.yaml", service("web", "10.96.0.1"))
    write(tmp_path / "b.yaml", service("web", "10.96.0.2"))
    sink = RecordingSink()
    start(tmp_path, sink, stop)
    # As a full reload of the directory in file order would: the last file wins.
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.2"})
    (tmp_path / "b.yaml").unlink()
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.1"})
    (tmp_path / "a.yaml").unlink()
    assert wait_for(lambda: sink.cluster_ips() == {})


def test_a_missing_directory_keeps_the_objects_and_a_returning_one_is_read(
    tmp_path: Path, stop: threading.Event
) -> None:
    path = tmp_path / "manifests"
    path.mkdir()
    write(path / "web.yaml", service("web", "10.96.0.1"))
    sink = RecordingSink()
    start(path, sink, stop)
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.1"})
    path.rename(tmp_path / "away")
    time.sleep(10 * POLL)
    assert sink.cluster_ips() == {"web": "10.96.0.1"}
    (tmp_path / "away").rename(path)
    write(path / "web.yaml", service("web", "10.96.0.9"))
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.9"})


def test_an_object_the_converter_raises_on_is_skipped_and_the_rest_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kproxy.state.ingest as ingest

    real = ingest.build_service_ports

    def fragile(obj: Any) -> Any:
        if obj["metadata"]["name"] == "bad":
            raise KeyError("spec")
        return real(obj)

    monkeypatch.setattr(ingest, "build_service_ports", fragile)
    state = ClusterState()
    errors = ingest.replace_all(
        "Service", [service("bad", "10.96.0.1"), service("good", "10.96.0.2")]
    )(state)
    assert state.service_keys() == {NamespacedName("default", "good")}
    assert [(e.obj, e.field) for e in errors] == [("Service default/bad", "(object)")]
    assert "KeyError" in errors[0].problem


def test_no_kind_is_synced_before_every_file_parsed_once(
    tmp_path: Path, stop: threading.Event
) -> None:
    write(tmp_path / "a.yaml", service("a", "10.96.0.1"))
    (tmp_path / "b.yaml").write_text("kind: [\n")
    sink = RecordingSink()
    start(tmp_path, sink, stop)
    assert wait_for(lambda: sink.cluster_ips() == {"a": "10.96.0.1"})
    time.sleep(10 * POLL)
    assert sink.synced_kinds == set()  # rules from a partial view would drop b's services
    write(tmp_path / "b.yaml", service("b", "10.96.0.2"))
    assert wait_for(lambda: sink.synced_kinds == {"Node", "Service", "EndpointSlice"})
    assert sink.cluster_ips() == {"a": "10.96.0.1", "b": "10.96.0.2"}
