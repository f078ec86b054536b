"""The file source for `kproxy run --manifests PATH`: the same objects as the API gives, read from
manifests. It polls PATH, re-reads only the files whose (mtime, size) changed, and applies one
mutation per changed file that touches only the objects that file changed, so the sync after a
one-file edit is partial however many files there are.

A file that fails to parse keeps its last good objects (an error names the file and line); a
deleted file takes its objects with it. No rule is written before every file has parsed once, so
a broken file at start-up never removes the rules a previous agent wrote for its services.
"""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

from kproxy.errors import ManifestError
from kproxy.model.kinds import Kind
from kproxy.state.ingest import Mutation, combine, set_node, set_objects
from kproxy.watch.manifest_index import FileChange, FileObjects, ManifestIndex
from kproxy.watch.manifests import ManifestParseError, load_file, scan_manifest_files
from kproxy.watch.sink import Sink
from kproxy.watch.supervisor import Backoff, Supervisor

log = structlog.get_logger("kproxy.watch")

Signature = tuple[int, int]  # (mtime_ns, size)
BACKOFF_CAP = 10.0  # a directory that comes back is noticed within this long


class ManifestSource:
    def __init__(self, path: str, node_name: str, poll_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.node_name = node_name
        self.poll_seconds = poll_seconds
        self.index = ManifestIndex()
        self._seen: dict[str, Signature] = {}
        self._unparsed: set[Path] = set()  # never parsed yet: hold the first sync back
        self._synced = False

    def start(self, sink: Sink, stop: threading.Event) -> list[Supervisor]:
        supervisor = Supervisor(
            "files",
            lambda sup: self.run(sink, sup),
            stop,
            backoff=Backoff(initial=self.poll_seconds, cap=max(BACKOFF_CAP, self.poll_seconds)),
            transient=(ManifestError, OSError),
            transient_event="manifests_unreadable",
            context={"path": str(self.path)},
        )
        return [supervisor.start()]

    def run(self, sink: Sink, supervisor: Supervisor) -> None:
        """Poll until stopped; every complete poll shows the source current."""
        while not supervisor.stop.is_set():
            self.poll(sink, supervisor)
            supervisor.current()
            supervisor.stop.wait(self.poll_seconds)

    def poll(self, sink: Sink, supervisor: Supervisor | None = None) -> None:
        """Apply every file change since the last poll. A file whose change cannot be applied is
        tried again next time; the others go ahead, then the first failure is raised."""
        found = scan_manifest_files(self.path)
        first = not self._seen and not self._synced
        changed = sorted(Path(p) for p, sig in found.items() if self._seen.get(p) != sig)
        removed = sorted(Path(p) for p in self._seen.keys() - found.keys())
        self._unparsed |= {p for p in changed if str(p) not in self._seen}
        self._unparsed -= set(removed)
        failed: list[tuple[Path, Exception]] = []
        for path in removed + changed:
            try:
                self._reload(sink, path, found.get(str(path)), quiet=first)
            except Exception as exc:  # one file's failure must not hold back the others
                failed.append((path, exc))
        if first and found:
            log.info("manifests_loaded", path=str(self.path), files=len(found))
        if not self._synced and not self._unparsed:
            for kind in (Kind.NODE, Kind.SERVICE, Kind.ENDPOINT_SLICE):
                sink.synced(kind)
            self._synced = True
        if failed:
            if supervisor is not None:
                supervisor.handling = ", ".join(str(p) for p, _ in failed)
            raise failed[0][1]

    def _reload(self, sink: Sink, path: Path, signature: Signature | None, quiet: bool) -> None:
        if signature is None:
            new: FileObjects | None = None
        else:
            try:
                manifests = load_file(path)
            except ManifestParseError as exc:
                self._seen[str(path)] = signature  # retried once the file changes again
                log.error(
                    "manifest_unparsable",
                    file=str(path),
                    line=exc.line,
                    error=exc.problem,
                    kept="last good objects" if path in self.index.files() else "none",
                )
                return
            for warning in manifests.warnings:
                log.warning("manifest_document_ignored", file=str(path), reason=warning)
            new = FileObjects.of(manifests)
        previous = self.index.get(path) if path in self.index.files() else None
        change = self.index.replace(path, new)
        try:
            if not change.empty:
                sink.apply(self._mutation(change))
        except Exception:
            self.index.replace(path, previous)  # not applied: the next poll tries again
            raise
        if signature is None:
            self._seen.pop(str(path), None)
        else:
            self._seen[str(path)] = signature
        self._unparsed.discard(path)
        if not quiet:
            log.info(
                "manifest_file_loaded" if new else "manifest_file_removed",
                file=str(path),
                changed=sum(len(c) for c in change.objects.values()),
            )

    def _mutation(self, change: FileChange) -> Mutation:
        parts = [set_objects(kind, objs) for kind, objs in change.objects.items() if objs]
        if change.nodes is not None:
            parts.append(set_node(self.node_name, change.nodes))
        return combine(*parts)
