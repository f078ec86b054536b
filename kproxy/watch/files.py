"""The file source for `kproxy run --manifests PATH`: the same objects as the API gives, read from
manifests and re-read whenever a file under PATH changes."""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

from kproxy.errors import ManifestError
from kproxy.state.ingest import combine, replace_all, set_node
from kproxy.watch.manifests import load_manifests, manifest_files
from kproxy.watch.sink import ENDPOINT_SLICE, NODE, SERVICE, Sink

log = structlog.get_logger("kproxy.watch")


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    files = manifest_files(path)
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)


class ManifestSource:
    def __init__(self, path: str, node_name: str, poll_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.node_name = node_name
        self.poll_seconds = poll_seconds

    def start(self, sink: Sink, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(sink, stop), daemon=True, name="files")
        thread.start()
        return thread

    def load(self, sink: Sink) -> None:
        manifests = load_manifests(self.path)
        for warning in manifests.warnings:
            log.warning("manifest_document_ignored", reason=warning)
        reload = combine(
            set_node(self.node_name, manifests.nodes),
            replace_all(SERVICE, manifests.services),
            replace_all(ENDPOINT_SLICE, manifests.endpoint_slices),
        )
        sink.apply(NODE, reload)
        for kind in (NODE, SERVICE, ENDPOINT_SLICE):
            sink.synced(kind)

    def run(self, sink: Sink, stop: threading.Event) -> None:
        """Load now, then again after every change, until `stop` is set. A file that fails to
        parse keeps the previous objects in force."""
        seen: tuple[tuple[str, int, int], ...] | None = None
        while not stop.is_set():
            try:
                signature = _signature(self.path)
                if signature != seen:
                    self.load(sink)
                    seen = signature
                    log.info("manifests_loaded", path=str(self.path), files=len(signature))
            except (ManifestError, OSError) as exc:
                log.error("manifests_unreadable", path=str(self.path), error=str(exc))
            stop.wait(self.poll_seconds)
