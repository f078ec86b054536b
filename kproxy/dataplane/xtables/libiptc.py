"""The libiptc adapter: kept copies of kernel tables, and the one place that edits and commits
them. Nothing else in kproxy touches python-iptables' handles.

A commit through libiptc replaces a whole table with the copy libiptc holds, edited. Reading that
copy (iptc_init) costs 0.4 s at 10,000 services, so kproxy keeps it between syncs, and keeps
it honest:

1. After a sync that committed a table or read it from the kernel, a background thread reads it
   again into a fresh copy, together with the kernel's image of its entries, while still holding
   the xtables lock the sync took (the lock is handed over, never released in between). No
   writer that takes the lock can come in between, so the copy, the image and what the kernel
   holds of kproxy's (`applied`) describe the same table.
2. Before the next commit from that copy, under the lock again, the kernel's image is read once
   more and compared with the kept one, entry by entry, counters aside. Only an exact match lets
   the copy be edited; otherwise the sync reads the table afresh, under the lock, and plans the
   change from what it holds now.

So every commit is based on what the kernel held at that moment, under the lock, and another
program's rules and chains survive exactly, in whatever order its writes and kproxy's come. A
writer that ignores the lock can still write between kproxy's check and its commit; the kernel
then refuses the commit only if the entry count changed (see the README).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kproxy.dataplane.xtables.diff import TableChanges
from kproxy.dataplane.xtables.entries import EntryCompiler
from kproxy.dataplane.xtables.kernel_image import ImageMatch, TableImage, read_image
from kproxy.dataplane.xtables.lock import HeldLock
from kproxy.rules.ir import Table

_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def _return_freed_memory() -> None:
    """Give the pages of freed malloc chunks back to the kernel. A libiptc copy is many small
    chunks (about the table's size again beside its blob); once freed, glibc keeps them resident
    in the arena that made them, while the next copy, read by the other thread, lands in the
    other arena (the agent's peak at 10,000 services: 649 MB without this, 607 MB with it)."""
    trim = getattr(_libc, "malloc_trim", None)  # glibc's; other C libraries go without
    if trim is not None:
        trim(0)


@dataclass(frozen=True, slots=True)
class KeptTable:
    """While the kernel's image of a table matches `image`, the kernel holds `applied` of
    kproxy's, and the libiptc copy of the table holds exactly that image."""

    applied: Table
    image: ImageMatch


class LibiptcTables:
    """One family's libiptc copies. python-iptables is not thread-safe: every use waits for the
    background reader to finish first."""

    def __init__(self, iptc: ModuleType, family: int) -> None:
        self.iptc = iptc
        self.family = family
        self.entries = EntryCompiler(iptc, family)
        self._kept: dict[str, KeptTable] = {}
        self._reader: threading.Thread | None = None

    def _table(self, name: str) -> Any:
        cls = self.iptc.Table if self.family == 4 else self.iptc.Table6
        return cls(name, autocommit=False)  # python-iptables keeps one object per table name

    def wait(self) -> None:
        """Let the background reader finish before python-iptables is used again."""
        if self._reader is not None:
            self._reader.join()
            self._reader = None

    def kept(self, name: str) -> KeptTable | None:
        self.wait()
        return self._kept.get(name)

    def kept_names(self) -> list[str]:
        self.wait()
        return list(self._kept)

    def forget(self, name: str) -> None:
        self.wait()
        self._kept.pop(name, None)

    def reread(self, name: str) -> None:
        """Read the copy of `name` from the kernel now (the caller holds the lock)."""
        self.wait()
        self._kept.pop(name, None)
        self._read(name)

    def _read(self, name: str) -> None:
        """Free the old copy of `name` and give its memory back before reading the new one."""
        table = self._table(name)
        table.close()  # no handle until the refresh below: python-iptables must not run between
        _return_freed_memory()
        table.refresh()

    def write(self, changes: TableChanges) -> None:
        """Edit the copy of the table and commit it. The copy must hold what the kernel holds:
        just re-read, or `still_current` under the same lock."""
        self.wait()
        self._kept.pop(changes.table, None)  # edited: no longer a copy of the kernel's table
        table = self._table(changes.table)
        lib, handle, iptc = table._iptc, table._handle, self.iptc
        for chain, positions in changes.remove_jumps.items():
            for pos in sorted(positions, reverse=True):
                if lib.iptc_delete_num_entry(chain.encode(), pos, handle) != 1:
                    raise iptc.IPTCError(f"can't delete rule {pos} of {chain}: {table.strerror()}")
        # libiptc directly, here and below: python-iptables' calls add a Python layer per call
        # (and its append_entry a ctypes cast, a reference cycle only the cyclic collector
        # frees). Chains are created in name order, the order libiptc keeps them in: it finds
        # each one's place from the last, twice as fast as in plan order (60,000 chains).
        created = set(changes.create)
        for name in sorted(changes.create):
            if lib.iptc_create_chain(name.encode(), handle) != 1:
                raise iptc.IPTCError(f"can't create chain {name}: {table.strerror()}")
        for wanted in changes.write:
            chain_name = wanted.name.encode()
            if wanted.name not in created and lib.iptc_flush_entries(chain_name, handle) != 1:
                raise iptc.IPTCError(f"can't flush chain {wanted.name}: {table.strerror()}")
            for rule in wanted.rules:
                if lib.iptc_append_entry(chain_name, self.entries.entry(rule), handle) != 1:
                    raise iptc.IPTCError(f"can't append to chain {wanted.name}: {table.strerror()}")
        for name in changes.delete:
            if lib.iptc_flush_entries(name.encode(), handle) != 1:
                raise iptc.IPTCError(f"can't flush chain {name}: {table.strerror()}")
        for name in changes.delete:
            if lib.iptc_delete_chain(name.encode(), handle) != 1:
                raise iptc.IPTCError(f"can't delete chain {name}: {table.strerror()}")
        for jump in changes.insert_jumps:
            entry, into = self.entries.entry(jump.rule), jump.chain.encode()
            if jump.append:  # e.g. the userspace mode's NodePort jumps, which must come last
                done = lib.iptc_append_entry(into, entry, handle)
            else:
                done = lib.iptc_insert_entry(into, entry, 0, handle)
            if done != 1:
                raise iptc.IPTCError(f"can't add to chain {jump.chain}: {table.strerror()}")
        table.commit()

    def keep(self, applied: dict[str, Table], lock: HeldLock) -> None:
        """Read these tables again in the background, under `lock` (handed over by the sync,
        released by the reader when its kernel reads are done), and keep them as KeptTables."""
        self.wait()

        def read_all() -> None:
            images: dict[str, TableImage | None] = {}
            try:
                for name in applied:
                    self._read(name)
                    images[name] = read_image(self.family, name)
            except Exception:
                images.clear()  # nothing is kept: the next sync reads the kernel
            finally:
                lock.release()
            for name, image in images.items():
                if image is not None:
                    self._kept[name] = KeptTable(applied[name], ImageMatch(image))

        self._reader = threading.Thread(target=read_all, daemon=True, name="iptc-reader")
        self._reader.start()
