"""The one place that writes the legacy x_tables: kproxy's changes carried out on the kernel's
own image of a table and the table replaced with the result, and what a next sync keeps of it.

A write replaces a whole table (IPT_SO_SET_REPLACE), so whatever it is built from must be what
the kernel holds at that moment, or another program's rules would be reverted. It is built from
the kernel's image of the table (IPT_SO_GET_ENTRIES, kernel_image.py), read under the xtables
lock right before the replace, never from a copy kept across syncs:

1. A full sync, and any sync that cannot prove the shortcut below, reads the image under the
   lock, plans the change from the table's rules (iptables-legacy-save) read under the same
   hold, edits the image (table_blob.py) and replaces the table (kernel_write.py).
2. A partial sync plans from what kproxy committed last (`KeptTable.applied`). That plan is
   valid only if nobody else wrote the table since: after each commit, a background thread
   reads the image again while still holding the lock the sync took (handed over, never
   released in between) and keeps its digest (ImageMatch), with the index of the blob that sync
   wrote (table_index.py: where its chains and jumps are). The next sync reads the image under
   the lock and writes from it, through that index, only when it matches that digest, counters
   aside (the same entries, so the same index); otherwise it takes path 1.

Both paths read the image they write from under the lock. A writer that ignores the lock can
still write between that read and the replace: the replace names the entry count it was built
from and the kernel refuses it when the count changed (EAGAIN), and the sync starts over from a
fresh read. Packet counters of every entry carried over are given back after the replace, as
libiptc's commit does. python-iptables stays the encoder of kproxy's rules (entries.py).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from types import ModuleType

from kproxy.dataplane.xtables.diff import TableChanges
from kproxy.dataplane.xtables.entries import EntryCompiler
from kproxy.dataplane.xtables.kernel_image import ImageMatch, TableImage, read_image
from kproxy.dataplane.xtables.kernel_write import replace_table
from kproxy.dataplane.xtables.lock import HeldLock
from kproxy.dataplane.xtables.table_blob import TableEdit
from kproxy.dataplane.xtables.table_index import TableIndex
from kproxy.rules.ir import Table


@dataclass(frozen=True, slots=True)
class KeptTable:
    """While the kernel's image of a table matches `image`, the kernel holds `applied` of
    kproxy's, and `index` (when known) tells where its chains and jumps are."""

    applied: Table
    image: ImageMatch
    index: TableIndex | None


class TableWriter:
    """One family's writer, and what it keeps of the tables it wrote for the next sync."""

    def __init__(self, iptc: ModuleType, family: int) -> None:
        self.family = family
        self.entries = EntryCompiler(iptc, family)
        self._kept: dict[str, KeptTable] = {}
        self._reader: threading.Thread | None = None

    def wait(self) -> None:
        """Let the background reader finish (it holds the xtables lock while it reads)."""
        if self._reader is not None:
            self._reader.join()
            self._reader = None

    def kept(self, name: str) -> KeptTable | None:
        self.wait()
        return self._kept.get(name)

    def kept_names(self) -> list[str]:
        self.wait()
        return list(self._kept)

    def kept_by_size(self) -> list[tuple[str, ImageMatch]]:
        """The kept tables with the digests of their images, the smallest first."""
        self.wait()
        kept = sorted(self._kept.items(), key=lambda item: item[1].image.fingerprint[1])
        return [(name, table.image) for name, table in kept]

    def forget(self, name: str) -> None:
        self.wait()
        self._kept.pop(name, None)

    def write(
        self, changes: TableChanges, image: TableImage, index: TableIndex | None = None
    ) -> TableIndex:
        """Replace the table with `image` edited by `changes`; the index of what was written.
        `image` must have been read under the xtables lock held now; `index`, if given, must
        be one of an image equal to it, counters aside. Raises TableChanged when the kernel's
        table no longer has the image's entry count."""
        self.wait()
        self._kept.pop(changes.table, None)  # about to change: what was kept no longer holds
        edit = TableEdit(image, index)
        edit.apply(changes)
        compiled = edit.compile(self.entries.write_entry)
        del edit
        (valid_hooks,) = struct.unpack_from("=I", image.hooks)
        try:
            replace_table(self.family, changes.table, valid_hooks, compiled, image.num_entries)
        finally:
            compiled.close()
        return compiled.index

    def keep(
        self, applied: dict[str, Table], indexes: dict[str, TableIndex], lock: HeldLock
    ) -> None:
        """Read these tables' images again in the background, under `lock` (handed over by the
        sync, released by the reader when its kernel reads are done), and keep their digests,
        with the index of what this sync wrote in them."""
        self.wait()

        def read_all() -> None:
            images: dict[str, TableImage | None] = {}
            try:
                for name in applied:
                    images[name] = read_image(self.family, name)
            except Exception:
                images.clear()  # nothing is kept: the next sync reads the kernel
            finally:
                lock.release()
            for name in list(images):
                image = images.pop(name)  # one image at a time: each is about the table's size
                before = self._kept.pop(name, None)
                if image is None:
                    continue
                match = ImageMatch(image)
                index = indexes.get(name)
                if index is None and before is not None and before.image.same(match):
                    index = before.index  # read, not written, and still the same entries
                self._kept[name] = KeptTable(applied[name], match, index)
                del image

        self._reader = threading.Thread(target=read_all, daemon=True, name="image-keeper")
        self._reader.start()
