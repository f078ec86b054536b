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

import kproxy.watch.files as files_module
import kproxy.watch.inotify as inotify_module
import kproxy.watch.manifests as manifests_module
from kproxy.errors import InvalidObjectError
from kproxy.model.service import NamespacedName
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import Mutation
from kproxy.watch.files import ManifestSource
from kproxy.watch.supervisor import Supervisor

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

    real = ingest.build_service

    def fragile(obj: Any, *args: Any) -> Any:
        if obj["metadata"]["name"] == "bad":
            raise KeyError("spec")
        return real(obj, *args)

    monkeypatch.setattr(ingest, "build_service", fragile)
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
    every_kind = {"Node", "Service", "EndpointSlice", "ServiceCIDR"}
    assert wait_for(lambda: sink.synced_kinds == every_kind)
    assert sink.cluster_ips() == {"a": "10.96.0.1", "b": "10.96.0.2"}


class Counted:
    """How often the source scanned the whole tree, and which files it parsed."""

    def __init__(self) -> None:
        self.scans = 0
        self.parsed: list[str] = []

    def reset(self) -> None:
        self.scans = 0
        del self.parsed[:]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counted:
    counts = Counted()
    real_scan = files_module.scan_manifest_files
    real_documents = manifests_module._documents

    def scan(path: Path) -> dict[str, tuple[int, int]]:
        counts.scans += 1
        return real_scan(path)

    def documents(path: Path) -> Iterator[Any]:
        counts.parsed.append(path.name)
        return real_documents(path)

    monkeypatch.setattr(files_module, "scan_manifest_files", scan)
    monkeypatch.setattr(manifests_module, "_documents", documents)
    return counts


def start_watching(path: Path, sink: RecordingSink, stop: threading.Event) -> Supervisor:
    # A full scan only at start: anything later must come from events.
    source = ManifestSource(str(path), "node-a", poll_seconds=POLL, full_scan_seconds=3600)
    return source.start(sink, stop)[0]


def many_files(root: Path, count: int = 50) -> None:
    for i in range(count):
        write(root / f"svc-{i}.yaml", service(f"svc-{i}", f"10.96.1.{i}"))


def test_a_write_renamed_into_place_is_applied_without_a_scan(
    tmp_path: Path, stop: threading.Event, counted: Counted
) -> None:
    many_files(tmp_path)
    sink = RecordingSink()
    start_watching(tmp_path, sink, stop)
    assert wait_for(lambda: len(sink.cluster_ips()) == 50 and sink.synced_kinds)
    assert counted.scans == 1
    counted.reset()
    write(tmp_path / "svc-7.yaml", service("svc-7", "10.96.2.7"))  # a temporary name, renamed
    assert wait_for(lambda: sink.cluster_ips()["svc-7"] == "10.96.2.7")
    (tmp_path / "svc-8.yaml").write_text(yaml.safe_dump(service("svc-8", "10.96.2.8")))
    assert wait_for(lambda: sink.cluster_ips()["svc-8"] == "10.96.2.8")
    assert (counted.scans, counted.parsed) == (0, ["svc-7.yaml", "svc-8.yaml"])


def test_a_deleted_file_takes_its_objects_without_a_scan(
    tmp_path: Path, stop: threading.Event, counted: Counted
) -> None:
    many_files(tmp_path, 5)
    sink = RecordingSink()
    start_watching(tmp_path, sink, stop)
    assert wait_for(lambda: len(sink.cluster_ips()) == 5)
    counted.reset()
    (tmp_path / "svc-3.yaml").unlink()
    assert wait_for(lambda: "svc-3" not in sink.cluster_ips())
    assert len(sink.cluster_ips()) == 4 and (counted.scans, counted.parsed) == (0, [])


def test_a_file_half_written_is_read_only_once_closed(
    tmp_path: Path, stop: threading.Event, counted: Counted
) -> None:
    sink = RecordingSink()
    start_watching(tmp_path, sink, stop)
    assert wait_for(lambda: sink.synced_kinds)
    text = yaml.safe_dump(service("web", "10.96.0.1"))
    with (tmp_path / "web.yaml").open("w") as f:
        f.write(text[:20])
        f.flush()
        time.sleep(10 * POLL)
        assert counted.parsed == []
        f.write(text[20:])
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.1"})
    assert counted.parsed == ["web.yaml"]


def test_a_new_subdirectory_is_watched(
    tmp_path: Path, stop: threading.Event, counted: Counted
) -> None:
    sink = RecordingSink()
    start_watching(tmp_path, sink, stop)
    assert wait_for(lambda: sink.synced_kinds)
    (tmp_path / "team").mkdir()
    write(tmp_path / "team" / "web.yaml", service("web", "10.96.0.1"))
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.1"})
    write(tmp_path / "team" / "web.yaml", service("web", "10.96.0.2"))
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.2"})
    assert counted.scans == 1  # the one at start


def test_an_overflowed_event_queue_falls_back_to_a_full_scan(
    tmp_path: Path, stop: threading.Event, counted: Counted, monkeypatch: pytest.MonkeyPatch
) -> None:
    overflow = threading.Event()

    class Overflowing(inotify_module.Inotify):
        def read(self) -> list[inotify_module.InotifyEvent]:
            events = super().read()
            if overflow.is_set():  # what the kernel sends once its queue was full
                events = [inotify_module.InotifyEvent(-1, inotify_module.IN_Q_OVERFLOW, 0, "")]
            return events

    monkeypatch.setattr(files_module, "Inotify", Overflowing)
    many_files(tmp_path, 5)
    sink = RecordingSink()
    start_watching(tmp_path, sink, stop)
    assert wait_for(lambda: len(sink.cluster_ips()) == 5)
    counted.reset()
    overflow.set()
    write(tmp_path / "svc-2.yaml", service("svc-2", "10.96.2.2"))  # its own event lost
    assert wait_for(lambda: sink.cluster_ips()["svc-2"] == "10.96.2.2")
    assert counted.scans >= 1 and counted.parsed == ["svc-2.yaml"]


@pytest.mark.parametrize("why", ["a single file", "no inotify", "on NFS"])
def test_without_inotify_the_path_is_polled(
    tmp_path: Path, stop: threading.Event, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    path = tmp_path / "all.yaml" if why == "a single file" else tmp_path
    if why == "no inotify":

        def unavailable() -> None:
            raise inotify_module.InotifyError("inotify_init1 failed (Too many open files)")

        monkeypatch.setattr(files_module, "Inotify", unavailable)
    if why == "on NFS":
        mountinfo = f"40 22 0:35 / {tmp_path} rw - nfs4 server:/export rw\n"
        monkeypatch.setattr(files_module, "_read_mountinfo", lambda: mountinfo)
    write(tmp_path / "all.yaml", service("web", "10.96.0.1"))
    sink = RecordingSink()
    with capture_logs() as logs:
        start(path, sink, stop)
        assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.1"})
    write(tmp_path / "all.yaml", service("web", "10.96.0.2"))
    assert wait_for(lambda: sink.cluster_ips() == {"web": "10.96.0.2"})
    assert [e["mode"] for e in logs if e["event"] == "manifests_followed"] == ["poll"]


def test_an_idle_watched_source_stays_current(tmp_path: Path, stop: threading.Event) -> None:
    sink = RecordingSink()
    supervisor = start_watching(tmp_path, sink, stop)
    assert wait_for(lambda: sink.synced_kinds)
    time.sleep(20 * POLL)  # longer than the timeout below, and no event meanwhile
    assert supervisor.problem(timeout=10 * POLL) is None
