"""ManifestIndex.holds: a changed file's lookup, without copying every file's path."""

from __future__ import annotations

from pathlib import Path

from kproxy.watch.manifest_index import FileObjects, ManifestIndex


def test_holds_a_file_from_its_first_objects_until_it_is_gone() -> None:
    index = ManifestIndex()
    path = Path("/manifests/web.yaml")
    assert not index.holds(path)
    index.replace(path, FileObjects())
    assert index.holds(path) and path in index.files()
    index.replace(path, None)
    assert not index.holds(path) and path not in index.files()
