"""The kernel backend: reads tables with iptables-legacy-save and writes them through
table_writer.py (kproxy's rules encoded by python-iptables, the table replaced from the kernel's
own image of it), one atomic replace per table, while holding the xtables lock.

Only chains whose rendered rules differ from the kernel's are rewritten; owned chains nobody wants
any more are deleted; jump rules in built-in chains are inserted once and never duplicated.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

from kproxy.dataplane.base import ApplyResult
from kproxy.dataplane.xtables.diff import (
    TableChanges,
    plan_cleanup,
    plan_table_changes,
    plan_table_changes_from,
)
from kproxy.dataplane.xtables.kernel_image import (
    ImageMatch,
    TableImage,
    fingerprint,
    read_image,
)
from kproxy.dataplane.xtables.kernel_write import TableChanged
from kproxy.dataplane.xtables.lock import LOCK_TIMEOUT, HeldLock, xtables_lock
from kproxy.dataplane.xtables.table_index import TableIndex
from kproxy.dataplane.xtables.table_writer import KeptTable, TableWriter
from kproxy.errors import DataplaneError
from kproxy.rules.ir import Ruleset, Table
from kproxy.rules.saved import SavedTable, parse_save

TABLES = ("filter", "nat", "mangle")
_COMMIT_ATTEMPTS = 3  # the kernel refuses a replace when another writer changed the table meanwhile


def _save_command(family: int) -> str:
    return "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"


def read_tables(family: int = 4, tables: tuple[str, ...] = TABLES) -> dict[str, SavedTable]:
    """The current content of the given tables, as iptables-legacy-save prints it."""
    text = []
    for table in tables:
        try:
            proc = subprocess.run(
                [_save_command(family), "-t", table],
                capture_output=True,
                text=True,
                errors="replace",  # another program's comment may hold any byte; never written back
                check=False,
            )
        except FileNotFoundError:
            raise DataplaneError(
                f"{_save_command(family)} not found: install the iptables package"
            ) from None
        if proc.returncode != 0:
            raise DataplaneError(
                f"{_save_command(family)} -t {table} failed: {proc.stderr.strip()}"
            )
        text.append(proc.stdout)
    return parse_save("".join(text))


def load_iptc() -> ModuleType:
    if os.geteuid() != 0:
        raise DataplaneError("kproxy must run as root (CAP_NET_ADMIN) to program netfilter tables")
    os.environ.setdefault("XTABLES_LIBDIR", _xtables_libdir())
    try:
        import iptc
    except Exception as exc:  # python-iptables raises several kinds when libiptc is missing
        raise DataplaneError(
            f"cannot load python-iptables/libiptc ({exc}); "
            "install libip4tc2, libip6tc2 and iptables"
        ) from exc
    module: ModuleType = iptc
    return module


def _xtables_libdir() -> str:
    for candidate in (
        "/usr/lib/x86_64-linux-gnu/xtables",
        "/usr/lib/aarch64-linux-gnu/xtables",
        "/usr/lib/xtables",
        "/usr/lib64/xtables",
    ):
        if os.path.isdir(candidate):
            return candidate
    return ""


class IptablesDataplane:
    """Applies Rulesets of one address family to the kernel of the current network namespace.

    Each table is synced on one of two explicit paths (see table_writer.py for why both are
    safe), and both write from the kernel's image of the table read under the lock:

    - from what was kept: the change is planned against what kproxy committed last, and written
      only once the kernel's image, read under the lock, matches the one kept after that commit;
    - from the kernel: the table is read (iptables-legacy-save for the plan, and its image)
      under the lock, which also repairs whatever another program changed or flushed.

    A full sync always takes the kernel path. A table with nothing to write is left alone on the
    kept path when its cheap fingerprint is unchanged; a changed one is read. When no table has
    anything to write, the lock is not even taken.
    """

    def __init__(
        self, family: int = 4, lock_timeout: float = LOCK_TIMEOUT, keep_copies: bool = True
    ) -> None:
        self.family = family
        self.lock_timeout = lock_timeout
        # Whether to keep a digest of each committed table's image for the next sync (read again
        # in the background): a process that syncs once never uses it.
        self.keep_copies = keep_copies
        self._iptc = load_iptc()
        self._tables = TableWriter(self._iptc, family)
        # The index of each table written in the current sync (kept with its digest for the
        # next one, which then need not read the table's entries to edit it).
        self._indexes: dict[str, TableIndex] = {}
        self._ahead: _Ahead | None = None

    def read(self) -> dict[str, SavedTable]:
        return read_tables(self.family)

    def close(self) -> None:
        """Let the background reader finish (it holds the xtables lock while it reads)."""
        self._tables.wait()

    @contextmanager
    def reading_ahead(self) -> Iterator[None]:
        """For a sync about to plan and then apply: take the lock now and read the kernel's
        image of each kept table in the background meanwhile, and compare it with the kept
        digest there, so the proof a partial write needs (0.2-0.3 s of kernel time and 0.05 s
        of hashing for nat at 10,000 services) is ready when the plan is, or nearly."""
        self._tables.wait()
        with xtables_lock(self.lock_timeout) as lock:
            images = _ImageReader(self.family, self._tables.kept_by_size())
            self._ahead = _Ahead(lock, images)
            try:
                yield
            finally:
                images.join()  # its reads belong to this hold of the lock
                self._ahead = None

    def apply(self, ruleset: Ruleset, full: bool = True) -> ApplyResult:
        """Make the kernel hold `ruleset`; each table is committed once, atomically."""
        if self._ahead is not None:
            return self._apply(ruleset, full, self._ahead)
        unchanged = None if full else self._nothing_to_write(ruleset)
        if unchanged is not None:
            return unchanged
        self._tables.wait()
        with xtables_lock(self.lock_timeout) as lock:
            return self._apply(ruleset, full, _Ahead(lock, None))

    def _nothing_to_write(self, ruleset: Ruleset) -> ApplyResult | None:
        """A partial sync's result when no table needs a write, found without the xtables lock:
        each table has a kept image, nothing to change from it, and an unchanged fingerprint (a
        read, which needs no lock). None: some table needs the locked path. The IPv6 process
        asking for the lock here waited out the IPv4 background reader's hold (0.6 s at 10,000
        services), doubling the sync of every IPv4-only change."""
        result = ApplyResult()
        for desired in ruleset.tables:
            kept = self._tables.kept(desired.name)
            changes = None if kept is None else plan_table_changes_from(desired, kept.applied)
            if kept is None or changes is None or not changes.empty:
                return None
            if fingerprint(self.family, desired.name) != kept.image.fingerprint:
                return None
            result.tables.append(changes)
        return result

    def _apply(self, ruleset: Ruleset, full: bool, ahead: _Ahead) -> ApplyResult:
        result = ApplyResult()
        touched: dict[str, Table] = {}
        self._indexes = {}
        for desired in ruleset.tables:
            changes = self._sync_table(desired, full, ahead.images)
            if changes.read_kernel or not changes.empty:
                touched[desired.name] = desired
            result.tables.append(changes)
        indexes, self._indexes = self._indexes, {}
        if touched and self.keep_copies:
            self._tables.keep(touched, indexes, ahead.lock.hand_over())
        else:
            # Nothing to read again: let go of the lock now, not when the sync ends. The other
            # family's process needs the same lock for its own apply in this sync (held until
            # then, a dual-stack sync that changed only IPv6 waited out the lock timeout).
            if ahead.images is not None:
                ahead.images.join()
            ahead.lock.release()
        return result

    def cleanup(self) -> ApplyResult:
        """Remove every kproxy/kube-proxy chain and jump rule, nothing else."""
        result = ApplyResult()
        with xtables_lock(self.lock_timeout):
            for name in TABLES:
                self._tables.forget(name)
                result.tables.append(self._commit(name, plan_cleanup))
        return result

    def _sync_table(self, desired: Table, full: bool, images: _ImageReader | None) -> TableChanges:
        kept = None if full else self._tables.kept(desired.name)
        if kept is not None:
            changes = plan_table_changes_from(desired, kept.applied)
            if changes is not None and changes.empty:
                # Skipping a write only needs an unchanged fingerprint, so that a flush or an
                # edit by another program is still repaired; the image read ahead under this
                # hold of the lock tells it as well as a GET_INFO now would.
                image = images.take(desired.name).image if images is not None else None
                now = image.fingerprint if image else fingerprint(self.family, desired.name)
                if now == kept.image.fingerprint:
                    return changes
            elif changes is not None and self._write_proven(desired.name, changes, kept, images):
                return changes
        return self._commit(desired.name, lambda saved: plan_table_changes(desired, saved))

    def _write_proven(
        self, name: str, changes: TableChanges, kept: KeptTable, images: _ImageReader | None
    ) -> bool:
        """Write `changes`, planned from memory, on the kernel's image of the table read under
        the lock, if that image matches the one kept after kproxy's last commit. False: not
        written (no match, or a writer without the lock came in between)."""
        read = images.take(name) if images is not None else _Read(None, False)
        current = read.image
        if current is None:
            current = read_image(self.family, name)
            if current is None or not kept.image.matches(current):
                return False
        elif not read.matched or read.match is not kept.image:
            return False
        try:
            self._write(changes, current, kept.index)
        except _Refused:
            return False
        return True

    def _commit(self, table: str, plan: Callable[[SavedTable], TableChanges]) -> TableChanges:
        """The kernel path: read the table's image and its rules under the lock, plan, and
        write from that image. Retried when the kernel refuses the replace (a writer that
        ignores the lock)."""
        for attempt in range(_COMMIT_ATTEMPTS):
            # The image first: a writer without the lock between the two reads changes the
            # entry count the replace names (most likely), and the kernel refuses it.
            image = read_image(self.family, table)
            changes = plan(read_tables(self.family, (table,)).get(table, SavedTable(table)))
            if changes.empty:
                return changes
            if image is None:
                raise DataplaneError(f"cannot read table {table} from the kernel")
            try:
                self._write(changes, image)
                return changes
            except _Refused:
                if attempt + 1 == _COMMIT_ATTEMPTS:
                    raise DataplaneError(
                        f"writing table {table} failed: the kernel refused {_COMMIT_ATTEMPTS} "
                        "commits in a row; another program keeps writing it without the lock"
                    ) from None
        raise AssertionError("unreachable")

    def _write(
        self, changes: TableChanges, image: TableImage, index: TableIndex | None = None
    ) -> None:
        try:
            self._indexes[changes.table] = self._tables.write(changes, image, index)
        except self._iptc.XTablesError as exc:
            # Nothing was written: the edit is discarded.
            raise DataplaneError(
                f"python-iptables could not build a rule for table {changes.table} ({exc}); are "
                "the iptables extensions installed in XTABLES_LIBDIR "
                f"({os.environ.get('XTABLES_LIBDIR') or 'unset'})?"
            ) from exc
        except TableChanged as exc:
            raise _Refused from exc  # the entry count changed between our read and the replace


@dataclass
class _Ahead:
    """The lock a sync holds, and the images read ahead under it (None: read when needed)."""

    lock: HeldLock
    images: _ImageReader | None


@dataclass
class _Read:
    """A table's image read ahead, and whether it matched `match` (the kept image's digest)."""

    image: TableImage | None
    matched: bool
    match: ImageMatch | None = None


class _ImageReader:
    """Reads tables' images in a thread of its own: getsockopt releases the GIL, so the kernel
    copies the entries while the planner runs, and each image is compared with the kept digest
    there too (hashlib hashes without the GIL). The smallest tables are read first and each is
    handed out as soon as it is read: a table with nothing to write is checked from its image,
    not with a GET_INFO, which would wait for the kernel's table mutex while the reader copies
    a larger table (0.1-0.2 s at 10,000 services, twice per one-service change)."""

    def __init__(self, family: int, kept: list[tuple[str, ImageMatch]]) -> None:
        self._reads: dict[str, _Read] = {}
        self._done = {name: threading.Event() for name, _ in kept}

        def read_all() -> None:
            for name, match in kept:
                read = _Read(None, False, match)
                try:
                    read.image = read_image(family, name)
                    read.matched = read.image is not None and match.matches(read.image)
                except OSError:
                    read.image = None
                finally:
                    self._reads[name] = read
                    self._done[name].set()

        self._thread = threading.Thread(target=read_all, daemon=True, name="image-reader")
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def take(self, name: str) -> _Read:
        """What was read of `name` (handed out once: an image is about the table's size)."""
        done = self._done.get(name)
        if done is None:
            return _Read(None, False)
        done.wait()
        return self._reads.pop(name, _Read(None, False))


class _Refused(Exception):
    """The kernel refused a replace: the table changed since its image was read."""
