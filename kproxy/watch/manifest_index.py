"""The objects of every manifest file, per file, and what a change to one file changes in the
cluster: the bookkeeping that lets `run --manifests` re-read only the files that changed.

An object defined in several files resolves as a full read of the directory in file order would:
the last file (in sorted path order) wins, and within a file the last document.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kproxy.model.kinds import Kind
from kproxy.model.service import NamespacedName
from kproxy.state.ingest import KEYED_KINDS, KeyedKind, object_key
from kproxy.watch.manifests import Manifests

Object = dict[str, Any]


@dataclass(frozen=True)
class FileObjects:
    """What one file holds, by kind and key."""

    services: Mapping[NamespacedName, Object] = field(default_factory=dict)
    endpoint_slices: Mapping[NamespacedName, Object] = field(default_factory=dict)
    nodes: tuple[Object, ...] = ()
    service_cidrs: tuple[Object, ...] = ()

    @classmethod
    def of(cls, manifests: Manifests) -> FileObjects:
        return cls(
            {object_key(o): o for o in manifests.services},
            {object_key(o): o for o in manifests.endpoint_slices},
            tuple(manifests.nodes),
            tuple(manifests.service_cidrs),
        )

    def by_kind(self, kind: KeyedKind) -> Mapping[NamespacedName, Object]:
        return self.services if kind is Kind.SERVICE else self.endpoint_slices


EMPTY = FileObjects()


@dataclass
class FileChange:
    """What replacing one file's objects changes: per kind, each key whose winning object
    differs (None: no file defines it any more), and the nodes (the ServiceCIDRs) of all files
    if they changed, in file order."""

    objects: dict[KeyedKind, dict[NamespacedName, Object | None]]
    nodes: list[Object] | None
    service_cidrs: list[Object] | None = None

    @property
    def empty(self) -> bool:
        return self.nodes is None and self.service_cidrs is None and not any(self.objects.values())


class ManifestIndex:
    def __init__(self) -> None:
        self._files: dict[Path, FileObjects] = {}
        # (kind, key) -> the files defining it, so a change resolves only its own keys.
        self._holders: dict[tuple[KeyedKind, NamespacedName], set[Path]] = {}

    def files(self) -> set[Path]:
        return set(self._files)

    def holds(self, path: Path) -> bool:
        """Whether `path` has objects here (without copying every path, as files() does)."""
        return path in self._files

    def get(self, path: Path) -> FileObjects:
        return self._files.get(path, EMPTY)

    def replace(self, path: Path, new: FileObjects | None) -> FileChange:
        """Make `path` hold `new` (None: the file is gone); returns what that changed."""
        old = self._files.get(path, EMPTY)
        new_objects = new or EMPTY
        keys = {
            kind: old.by_kind(kind).keys() | new_objects.by_kind(kind).keys()
            for kind in KEYED_KINDS
        }
        before = {kind: {k: self._winner(kind, k) for k in ks} for kind, ks in keys.items()}
        self._store(path, old, new)
        change = FileChange({}, None)
        for kind, ks in keys.items():
            after = {k: self._winner(kind, k) for k in ks}
            change.objects[kind] = {
                k: obj for k, obj in after.items() if not _same(obj, before[kind][k])
            }
        if old.nodes != new_objects.nodes:
            change.nodes = [n for p in sorted(self._files) for n in self._files[p].nodes]
        if old.service_cidrs != new_objects.service_cidrs:
            files = sorted(self._files)
            change.service_cidrs = [c for p in files for c in self._files[p].service_cidrs]
        return change

    def _store(self, path: Path, old: FileObjects, new: FileObjects | None) -> None:
        for kind in KEYED_KINDS:
            for key in old.by_kind(kind):
                holders = self._holders[(kind, key)]
                holders.discard(path)
                if not holders:
                    del self._holders[(kind, key)]
            for key in (new or EMPTY).by_kind(kind):
                self._holders.setdefault((kind, key), set()).add(path)
        if new is None:
            self._files.pop(path, None)
        else:
            self._files[path] = new

    def _winner(self, kind: KeyedKind, key: NamespacedName) -> Object | None:
        holders = self._holders.get((kind, key))
        if not holders:
            return None
        return self._files[max(holders)].by_kind(kind)[key]


def _same(a: Object | None, b: Object | None) -> bool:
    return a is b or a == b
