"""watch/inotify against the real kernel (no root needed): events decoded from what the kernel
writes, and a TreeWatch naming exactly the files that changed, or asking for a full scan when the
events cannot tell."""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.watch.inotify import (
    DIRECTORY_EVENTS,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_ISDIR,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Inotify,
    InotifyEvent,
    TreeChanges,
    TreeWatch,
    blind_filesystem,
    parse_events,
)

PATIENCE = 5.0


def packed(wd: int, mask: int, cookie: int, name: bytes, padded: int) -> bytes:
    return struct.pack("iIII", wd, mask, cookie, padded) + name.ljust(padded, b"\0")


def test_events_are_decoded_with_their_padded_names() -> None:
    buf = packed(1, IN_MOVED_TO, 7, b"web.yaml", 16) + packed(-1, IN_Q_OVERFLOW, 0, b"", 0)
    assert parse_events(buf) == [
        InotifyEvent(1, IN_MOVED_TO, 7, "web.yaml"),
        InotifyEvent(-1, IN_Q_OVERFLOW, 0, ""),
    ]


@pytest.fixture
def inotify() -> Iterator[Inotify]:
    instance = Inotify()
    yield instance
    instance.close()


def read_until(inotify: Inotify, count: int) -> list[InotifyEvent]:
    events: list[InotifyEvent] = []
    deadline = time.monotonic() + PATIENCE
    while len(events) < count and time.monotonic() < deadline:
        if inotify.wait(0.1):
            events += inotify.read()
    return events


def test_the_kernel_reports_a_close_after_writing_and_a_rename_into_place(
    tmp_path: Path, inotify: Inotify
) -> None:
    wd = inotify.add_watch(str(tmp_path), DIRECTORY_EVENTS)
    assert not inotify.wait(0) and inotify.read() == []
    (tmp_path / "a.yaml").write_text("x")
    (tmp_path / "tmp").write_text("y")
    (tmp_path / "tmp").rename(tmp_path / "b.yaml")
    events = read_until(inotify, 5)
    closed = [(e.wd, e.name) for e in events if e.mask & IN_CLOSE_WRITE]
    assert closed == [(wd, "a.yaml"), (wd, "tmp")]
    moved = [e for e in events if e.mask & IN_MOVED_TO]
    assert [e.name for e in moved] == ["b.yaml"] and moved[0].cookie != 0


def test_a_missing_directory_cannot_be_watched(tmp_path: Path, inotify: Inotify) -> None:
    with pytest.raises(OSError) as raised:
        inotify.add_watch(str(tmp_path / "missing"), DIRECTORY_EVENTS)
    assert raised.value.errno == errno.ENOENT


def is_manifest(name: str) -> bool:
    return name.endswith(".yaml")


@pytest.fixture
def tree(tmp_path: Path, inotify: Inotify) -> TreeWatch:
    (tmp_path / "sub").mkdir()
    watch = TreeWatch(str(tmp_path), is_manifest, inotify)
    watch.rewatch()
    return watch


def collect(watch: TreeWatch, *expected: Path, rescan: bool = False) -> TreeChanges:
    """Changes until the expected ones arrived (or PATIENCE ran out)."""
    total = TreeChanges()
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        changes = watch.changes(0.05)
        total.paths |= changes.paths
        total.rescan |= changes.rescan
        if {str(p) for p in expected} <= total.paths and total.rescan >= rescan:
            break
    return total


def test_the_tree_names_written_renamed_and_deleted_files_only(
    tmp_path: Path, tree: TreeWatch
) -> None:
    assert tree.watched() == {str(tmp_path), str(tmp_path / "sub")}
    (tmp_path / "sub" / "a.yaml").write_text("a")
    (tmp_path / ".b.yaml.tmp").write_text("b")
    (tmp_path / ".b.yaml.tmp").rename(tmp_path / "b.yaml")
    (tmp_path / "notes.txt").write_text("ignored")
    changes = collect(tree, tmp_path / "sub" / "a.yaml", tmp_path / "b.yaml")
    assert changes.paths == {str(tmp_path / "sub" / "a.yaml"), str(tmp_path / "b.yaml")}
    assert not changes.rescan
    (tmp_path / "b.yaml").unlink()
    assert collect(tree, tmp_path / "b.yaml").paths == {str(tmp_path / "b.yaml")}


def test_a_file_still_being_written_is_not_named_until_closed(
    tmp_path: Path, tree: TreeWatch
) -> None:
    with (tmp_path / "a.yaml").open("w") as f:
        f.write("kind: Serv")
        f.flush()
        os.fsync(f.fileno())
        assert tree.changes(0.1).paths == set()
    assert collect(tree, tmp_path / "a.yaml").paths == {str(tmp_path / "a.yaml")}


def test_a_new_directory_is_watched_and_its_files_named(tmp_path: Path, tree: TreeWatch) -> None:
    (tmp_path / "new").mkdir()
    assert collect(tree).paths == set()
    assert str(tmp_path / "new") in tree.watched()
    (tmp_path / "new" / "c.yaml").write_text("c")
    assert collect(tree, tmp_path / "new" / "c.yaml").paths == {str(tmp_path / "new" / "c.yaml")}
    # Made elsewhere, files and all, then moved in: its files have no events of their own.
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "d.yaml").write_text("d")
    outside.rename(tmp_path / "moved")
    expected = tmp_path / "moved" / "deep" / "d.yaml"
    changes = collect(tree, expected)
    assert changes.paths == {str(expected)} and not changes.rescan
    assert str(tmp_path / "moved" / "deep") in tree.watched()


@pytest.mark.parametrize("how", ["removed", "moved away", "root moved"])
def test_a_directory_going_away_asks_for_a_full_scan(
    tmp_path: Path, tree: TreeWatch, how: str
) -> None:
    if how == "removed":
        (tmp_path / "sub").rmdir()
    elif how == "moved away":
        (tmp_path / "sub").rename(tmp_path.parent / f"{tmp_path.name}-away")
    else:
        tmp_path.rename(tmp_path.parent / f"{tmp_path.name}-moved")
    assert collect(tree, rescan=True).rescan


def test_a_symlink_to_a_directory_appearing_asks_for_a_full_scan(
    tmp_path: Path, tree: TreeWatch
) -> None:
    # A ConfigMap volume's update: a new `..data` symlink renamed over the old one.
    (tmp_path / "..data_tmp").symlink_to("sub")
    (tmp_path / "..data_tmp").rename(tmp_path / "..data")
    assert collect(tree, rescan=True).rescan
    tree.rewatch()
    assert tree.watched() == {str(tmp_path), str(tmp_path / "sub")}  # one watch per directory


class ScriptedInotify(Inotify):
    """The real thing, plus events the kernel only sends under pressure."""

    def __init__(self, extra: list[InotifyEvent]) -> None:
        super().__init__()
        self.extra = extra

    def wait(self, timeout: float) -> bool:
        return bool(self.extra) or super().wait(timeout)

    def read(self) -> list[InotifyEvent]:
        events, self.extra = self.extra + super().read(), []
        return events


def test_an_overflowed_queue_asks_for_a_full_scan(tmp_path: Path) -> None:
    inotify = ScriptedInotify([InotifyEvent(-1, IN_Q_OVERFLOW, 0, "")])
    try:
        watch = TreeWatch(str(tmp_path), is_manifest, inotify)
        watch.rewatch()
        assert watch.changes(0).rescan
    finally:
        inotify.close()


def test_events_of_a_watch_removed_since_are_ignored(tmp_path: Path) -> None:
    inotify = ScriptedInotify([InotifyEvent(999, IN_CREATE | IN_ISDIR, 0, "x")])
    try:
        watch = TreeWatch(str(tmp_path), is_manifest, inotify)
        watch.rewatch()
        assert watch.changes(0) == TreeChanges()
    finally:
        inotify.close()


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /srv/shared rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2
41 22 0:36 / /srv/my\\040files rw master:3 - fuse.sshfs host:/ rw
42 40 0:37 / /srv/shared/local rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(
    ("path", "blind"),
    [
        ("/srv/shared/manifests", "nfs4"),
        ("/srv/shared", "nfs4"),
        ("/srv/sharedx", None),  # a sibling with a longer name is on /
        ("/srv/shared/local/m", None),  # the innermost mount decides
        ("/srv/my files/m", "fuse.sshfs"),
        ("/etc/kproxy", None),
    ],
)
def test_filesystems_whose_remote_changes_have_no_events_are_known(
    path: str, blind: str | None
) -> None:
    assert blind_filesystem(path, MOUNTINFO) == blind
