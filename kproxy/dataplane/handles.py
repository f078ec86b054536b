"""libiptc handles kept between syncs.

A handle is a full copy of a kernel table (iptc_init: 0.4 s at 10,000 services). After kproxy
commits, it re-reads the tables it wrote in a background thread, so the next sync starts with a
current handle instead of waiting for the copy. A handle is used only while the table's fingerprint
(entry count and size) is still the one it was read at; otherwise it is read again. If another
writer changes the table between that check and kproxy's commit, the kernel refuses the commit
(the entry count no longer matches) and the sync retries with a fresh handle.

python-iptables is not thread-safe, so every other use of it waits for the refresh to finish.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

from kproxy.dataplane.tableinfo import table_info


class Handles:
    def __init__(self, iptc: ModuleType, family: int) -> None:
        self.iptc = iptc
        self.family = family
        self._fingerprints: dict[str, tuple[int, int] | None] = {}
        self._refresher: threading.Thread | None = None

    def _table(self, name: str) -> Any:
        cls = self.iptc.Table if self.family == 4 else self.iptc.Table6
        return cls(name, autocommit=False)

    def wait(self) -> None:
        """Let a background refresh finish before python-iptables is used again."""
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None

    def acquire(self, name: str, fingerprint: tuple[int, int] | None) -> Any:
        """A handle on table `name` that holds what the kernel holds (`fingerprint`)."""
        self.wait()
        table = self._table(name)
        if fingerprint is None or self._fingerprints.get(name) != fingerprint:
            self._refresh(name, table)
        self._fingerprints[name] = None  # about to be edited: no longer a clean copy
        return table

    def _refresh(self, name: str, table: Any) -> None:
        before = table_info(self.family, name)
        table.refresh()
        after = table_info(self.family, name)
        # If the table changed while it was copied, the copy's fingerprint is unknown.
        self._fingerprints[name] = before if before == after else None

    def refresh_later(self, names: list[str]) -> None:
        """Re-read these tables in the background (after a commit)."""
        self.wait()
        if not names:
            return

        def refresh_all() -> None:
            for name in names:
                try:
                    self._refresh(name, self._table(name))
                except Exception:
                    self._fingerprints[name] = None  # acquire() will read it again

        self._refresher = threading.Thread(target=refresh_all, daemon=True, name="iptc-refresh")
        self._refresher.start()

    def forget(self, name: str) -> None:
        self._fingerprints[name] = None
