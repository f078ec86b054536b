"""Linux inotify through libc (ctypes), and a watch over a directory tree built on it: which
wanted files under the tree may have changed, or that only a full scan can tell.

A file counts as changed when it was closed after writing or renamed into place, never on a bare
write, so a file still being written is not read half-way. Anything the events cannot answer
exactly (the kernel queue overflowed, a watched directory went away, a directory or a symlink to
one moved) asks for a full scan instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import select
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kproxy.errors import KproxyError

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

DIRECTORY_EVENTS = (
    IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_DELETE
    | IN_CREATE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
# Filesystems where a change made elsewhere (another host, a FUSE daemon) never reaches inotify.
BLIND_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "9p", "ceph", "glusterfs", "lustre", "afs")
_OCTAL = re.compile(r"\\([0-7]{3})")
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then name[len]
_READ_SIZE = 64 * 1024


# Out of descriptors, instances, memory or watches: maybe only for now, worth trying again.
SHORTAGE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC))


class InotifyError(KproxyError):
    """inotify cannot be used here (no support, or out of instances or watches): poll instead.
    `code` is the errno behind it, if any; `shortage` says it may pass."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def shortage(self) -> bool:
        return self.code in SHORTAGE_ERRNOS


@dataclass(frozen=True)
class InotifyEvent:
    wd: int
    mask: int
    cookie: int
    name: str


def parse_events(buf: bytes) -> list[InotifyEvent]:
    """The events in one read() of an inotify fd; the kernel pads names with NULs."""
    events = []
    offset = 0
    while offset + _HEADER.size <= len(buf):
        wd, mask, cookie, length = _HEADER.unpack_from(buf, offset)
        offset += _HEADER.size
        raw = buf[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append(InotifyEvent(wd, mask, cookie, os.fsdecode(raw)))
    return events


def blind_filesystem(path: str, mountinfo: str) -> str | None:
    """The type of the filesystem holding `path` (per /proc/self/mountinfo's text) if inotify
    cannot see every change on it, else None."""
    real = os.path.realpath(path)
    best, kind = "", ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        mount = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4])  # \040 is a space
        under = real == mount or real.startswith(mount.rstrip("/") + "/")
        if under and len(mount) >= len(best):
            best, kind = mount, fields[fields.index("-", 6) + 1]
    return kind if kind in BLIND_FILESYSTEMS or kind.startswith("fuse") else None


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if not hasattr(libc, "inotify_init1"):
        raise InotifyError("libc has no inotify_init1")
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


class Inotify:
    """One inotify instance: a non-blocking fd, closed on exec."""

    def __init__(self) -> None:
        try:
            self._libc = _libc()
        except OSError as exc:
            raise InotifyError(f"libc cannot be loaded ({exc})") from exc
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise InotifyError(f"inotify_init1 failed ({os.strerror(code)})", code)
        self.fd: int = fd

    def add_watch(self, path: str, mask: int) -> int:
        """The watch descriptor (the same one again for a directory already watched)."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return int(wd)

    def remove_watch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # fails only for a watch already gone

    def wait(self, timeout: float) -> bool:
        """Whether events are ready, waiting at most `timeout` seconds."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def read(self) -> list[InotifyEvent]:
        """Every event queued now (none if none)."""
        events: list[InotifyEvent] = []
        while True:
            try:
                buf = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return events
            events += parse_events(buf)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class TreeChanges:
    """What the events since the last look say: these wanted files may have changed (exist,
    changed or gone), or `rescan`: only a full scan can tell."""

    paths: set[str] = field(default_factory=set)
    rescan: bool = False


class TreeWatch:
    """Watches `root` and every directory under it, symlinked ones followed, each once: the
    directories a scan of the tree descends into. `wanted(name)` picks the files that matter."""

    def __init__(self, root: str, wanted: Callable[[str], bool], inotify: Inotify) -> None:
        self.root = root
        self.wanted = wanted
        self.inotify = inotify
        self._dirs: dict[int, str] = {}  # wd -> the directory's path, as a scan names it
        self._paths: set[str] = set()
        self._inodes: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every directory watched

    def watched(self) -> set[str]:
        return set(self._paths)

    def rewatch(self) -> None:
        """Watch exactly the directories under root now (before a full scan, so no change
        between the two is lost)."""
        inodes: set[tuple[int, int]] = set()
        found = dict(self._watch_walk(self.root, inodes))
        for wd in self._dirs.keys() - found.keys():
            self.inotify.remove_watch(wd)
        self._dirs, self._paths, self._inodes = found, set(found.values()), inodes

    def changes(self, timeout: float) -> TreeChanges:
        """Wait at most `timeout` for events, then say what they changed."""
        result = TreeChanges()
        if self.inotify.wait(timeout):
            for event in self.inotify.read():
                self._account(event, result)
        return result

    def _watch_walk(self, directory: str, seen: set[tuple[int, int]]) -> Iterator[tuple[int, str]]:
        # The same descent as the manifest scan: symlinks followed, each directory inode once.
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            wd = self.inotify.add_watch(directory, DIRECTORY_EVENTS | IN_ONLYDIR)
            entries = list(os.scandir(directory))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # removed while being walked: gone
            raise InotifyError(f"cannot watch {directory} ({exc.strerror})", exc.errno) from exc
        yield wd, directory
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir:
                yield from self._watch_walk(entry.path, seen)

    def _account(self, event: InotifyEvent, result: TreeChanges) -> None:
        if event.mask & IN_Q_OVERFLOW:
            result.rescan = True
            return
        directory = self._dirs.get(event.wd)
        if directory is None:
            return  # a watch removed since: its events no longer matter
        if event.mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
            result.rescan = True  # a watched directory went away or moved
            return
        path = os.path.join(directory, event.name)
        if event.mask & IN_ISDIR:
            self._account_directory(event, path, result)
        elif self.wanted(event.name):
            self._account_file(event, path, result)
        elif path in self._paths or os.path.isdir(path):
            result.rescan = True  # a symlink to a directory appeared, moved or went away

    def _account_directory(self, event: InotifyEvent, path: str, result: TreeChanges) -> None:
        if not event.mask & (IN_CREATE | IN_MOVED_TO):
            result.rescan = True  # the files under it went with it
            return
        # Watch it at once, then list it: a file made before its watch was added has no event.
        for wd, directory in self._watch_walk(path, self._inodes):
            self._dirs[wd] = directory
            self._paths.add(directory)
            result.paths |= set(self._wanted_files(directory))

    def _account_file(self, event: InotifyEvent, path: str, result: TreeChanges) -> None:
        if event.mask & (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE):
            result.paths.add(path)
        elif event.mask & IN_CREATE and os.path.islink(path):
            result.paths.add(path)  # a symlink is complete when made; no close follows

    def _wanted_files(self, directory: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        yield from (e.path for e in entries if self.wanted(e.name))
