"""The file source for `kproxy run --manifests PATH`: the same objects as the API gives (the
ServiceCIDRs too), read from manifests. It follows PATH with inotify where it can (polling where
it cannot), re-reads only the files that changed, and applies one mutation per changed file that
touches only the objects that file changed, so the sync after a one-file edit is partial however
many files there are.

A file that fails to parse keeps its last good objects (an error names the file and line); a
deleted file takes its objects with it. No rule is written before every file has parsed once, so
a broken file at start-up never removes the rules a previous agent wrote for its services.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

from kproxy.errors import ManifestError
from kproxy.model.kinds import Kind
from kproxy.state.ingest import Mutation, combine, set_node, set_objects, set_service_cidrs
from kproxy.watch.inotify import (
    Inotify,
    InotifyError,
    TreeChanges,
    TreeWatch,
    blind_filesystem,
)
from kproxy.watch.manifest_index import FileChange, FileObjects, ManifestIndex
from kproxy.watch.manifests import (
    SUFFIXES,
    ManifestParseError,
    Manifests,
    load_file,
    log_ignored_documents,
    scan_manifest_files,
    warn_empty,
)
from kproxy.watch.sink import Sink
from kproxy.watch.supervisor import Backoff, Supervisor

log = structlog.get_logger("kproxy.watch")

Signature = tuple[int, int]  # (mtime_ns, size)
BACKOFF_CAP = 10.0  # a directory that comes back is noticed within this long
FULL_SCAN_SECONDS = 30.0  # with inotify: a full scan this often, in case an event was missed


class ManifestSource:
    def __init__(
        self,
        path: str,
        node_name: str,
        poll_seconds: float = 1.0,
        full_scan_seconds: float = FULL_SCAN_SECONDS,
        use_inotify: bool = True,
    ) -> None:
        self.path = Path(path)
        self.node_name = node_name
        self.poll_seconds = poll_seconds  # the scan interval without inotify; liveness with it
        self.full_scan_seconds = full_scan_seconds
        self.use_inotify = use_inotify
        self._mode = ""
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
        """Follow PATH until stopped. Every look that left nothing unapplied shows the source
        current; one that failed raises, and the next run starts with a full scan."""
        try:
            watch = self._open_watch()
        except InotifyError as exc:  # a shortage (EMFILE...): poll, then try inotify again
            self._report_mode("poll", str(exc))
            self._run_polling(sink, supervisor, time.monotonic() + self.full_scan_seconds)
            return
        try:
            if watch is None:
                self._run_polling(sink, supervisor)
            else:
                self._run_watching(sink, supervisor, watch)
        finally:
            if watch is not None:
                watch.inotify.close()

    def _open_watch(self) -> TreeWatch | None:
        """A watch over PATH, or None where inotify cannot tell of every change (PATH a single
        file or missing, inotify not available): then PATH is polled. Raises InotifyError when
        inotify is short of something that may come back (descriptors, watches)."""
        if not self.use_inotify:
            self._report_mode("poll", "inotify not wanted")
            return None
        if not self.path.is_dir():
            self._report_mode("poll", "not a directory")
            return None
        blind = blind_filesystem(str(self.path), _read_mountinfo())
        if blind is not None:
            self._report_mode("poll", f"on {blind}, changes made elsewhere have no events")
            return None
        try:
            return TreeWatch(str(self.path), _is_manifest, Inotify())
        except InotifyError as exc:
            if exc.shortage:
                raise
            self._report_mode("poll", str(exc))
            return None

    def _run_polling(self, sink: Sink, supervisor: Supervisor, until: float | None = None) -> None:
        """Poll until stopped, or until `until` (then the caller tries inotify again)."""
        while not supervisor.stop.is_set() and (until is None or time.monotonic() < until):
            self.poll(sink, supervisor)
            supervisor.current()
            supervisor.stop.wait(self.poll_seconds)

    def _run_watching(self, sink: Sink, supervisor: Supervisor, watch: TreeWatch) -> None:
        """Re-read the files inotify names as they change; a full scan first (after the watches
        are in place, so nothing changed in between is lost), whenever the events cannot tell,
        and every full_scan_seconds in case they missed something."""
        changes = TreeChanges(rescan=True)
        next_scan = 0.0
        try:
            while not supervisor.stop.is_set():
                if changes.rescan or time.monotonic() >= next_scan:
                    watch.rewatch()
                    self._report_mode("inotify", f"{len(watch.watched())} directories")
                    self.poll(sink, supervisor)
                    next_scan = time.monotonic() + self.full_scan_seconds
                elif changes.paths:
                    self.reload(sink, changes.paths, supervisor)
                supervisor.current()
                # Woken by an event at once; otherwise in time to show the source current.
                wait = min(self.poll_seconds, max(0.0, next_scan - time.monotonic()))
                changes = watch.changes(wait)
        except InotifyError as exc:  # out of watches or descriptors as the tree grew
            self._report_mode("poll", str(exc))
            # A shortage may pass: poll for a while, then return to watch again.
            until = time.monotonic() + self.full_scan_seconds if exc.shortage else None
            self._run_polling(sink, supervisor, until)

    def _report_mode(self, mode: str, reason: str) -> None:
        if mode != self._mode:
            log.info("manifests_followed", path=str(self.path), mode=mode, reason=reason)
            self._mode = mode

    def poll(self, sink: Sink, supervisor: Supervisor | None = None) -> None:
        """A full scan: apply every file change since the last one. A file whose change cannot
        be applied is tried again by the next scan; the others go ahead, then the first failure
        is raised."""
        found = scan_manifest_files(self.path)
        first = not self._seen and not self._synced
        changed = [p for p, sig in found.items() if self._seen.get(p) != sig]
        removed = list(self._seen.keys() - found.keys())
        self._apply(sink, removed + changed, found, first, supervisor)
        if first and found:
            log.info("manifests_loaded", path=str(self.path), files=len(found))
        elif first:
            warn_empty(Manifests(), self.path)

    def reload(
        self, sink: Sink, paths: Iterable[str], supervisor: Supervisor | None = None
    ) -> None:
        """Apply the changes of these files only (each re-read, whatever its signature: two
        writes within one clock tick can leave it the same)."""
        found: dict[str, Signature] = {}
        known: list[str] = []
        for path in paths:
            signature = _signature(path)
            if signature is not None:
                found[path] = signature
            if signature is not None or path in self._seen:
                known.append(path)  # a file made and removed unseen is no change
        self._apply(sink, known, found, False, supervisor)

    def _apply(
        self,
        sink: Sink,
        paths: list[str],
        found: dict[str, Signature],
        quiet: bool,
        supervisor: Supervisor | None,
    ) -> None:
        self._unparsed |= {Path(p) for p in paths if p in found and p not in self._seen}
        self._unparsed -= {Path(p) for p in paths if p not in found}
        failed: list[tuple[Path, Exception]] = []
        for path in sorted(Path(p) for p in paths):
            try:
                self._reload(sink, path, found.get(str(path)), quiet)
            except Exception as exc:  # one file's failure must not hold back the others
                failed.append((path, exc))
        if not self._synced and not self._unparsed:
            for kind in (Kind.NODE, Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.SERVICE_CIDR):
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
                    kept="last good objects" if self.index.holds(path) else "none",
                )
                return
            log_ignored_documents(manifests, file=str(path))
            if not manifests.warnings:  # a file of only other kinds was warned about above
                warn_empty(manifests, path)
            new = FileObjects.of(manifests)
        previous = self.index.get(path) if self.index.holds(path) else None
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
        if change.service_cidrs is not None:
            parts.append(set_service_cidrs(change.service_cidrs))
        return combine(*parts)


def _is_manifest(name: str) -> bool:
    return name.endswith(SUFFIXES)


def _read_mountinfo() -> str:
    try:
        return Path("/proc/self/mountinfo").read_text()
    except OSError:
        return ""  # no /proc: nothing known against inotify


def _signature(path: str) -> Signature | None:
    """As the scan would record it; None for a file that is gone (or is no regular file)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_mtime_ns, st.st_size) if stat.S_ISREG(st.st_mode) else None
