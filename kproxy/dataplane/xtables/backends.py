"""Opening the iptables mode's dataplanes on the backend the node uses (detect.py), and removing
what kproxy left in the other one: a node moved between backends (or a kproxy upgraded to detect
them) must not keep two rule sets that both rewrite Service traffic."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from kproxy.dataplane.base import Dataplane, TableReport
from kproxy.dataplane.host import node_families
from kproxy.dataplane.xtables.backend import TABLES, read_tables
from kproxy.dataplane.xtables.detect import BackendChoice, detect_backend, save_command
from kproxy.dataplane.xtables.families import (
    legacy_tables_in_use,
    open_dataplanes,
    remove_xtables_chains,
)
from kproxy.dataplane.xtables.lock import lock_path, xtables_lock
from kproxy.dataplane.xtables.nft_backend import KeptTables, NftDataplane, read_nft_tables
from kproxy.dataplane.xtables.nft_generation import read_generation
from kproxy.errors import DataplaneError
from kproxy.plan.iptables.chains import is_cleanup_chain
from kproxy.rules.saved import SavedTable, parse_save

log = structlog.get_logger("kproxy.dataplane")

_logged: set[tuple[str, str]] = set()


def choose_backend(configured: str) -> BackendChoice:
    """The backend, logged once per process and choice."""
    choice = detect_backend(configured)
    if (choice.backend, choice.reason) not in _logged:
        _logged.add((choice.backend, choice.reason))
        log.info("iptables_backend_chosen", backend=choice.backend, reason=choice.reason)
    return choice


@contextmanager
def open_backend_dataplanes(
    lock_timeout: float, backend: str, keep_copies: bool = True
) -> Iterator[dict[int, Dataplane]]:
    """One dataplane per family on `backend` ("legacy" or "nft"); `keep_copies`: whether the
    legacy backend keeps what a next sync needs of the tables it wrote (digest and index)."""
    if backend == "legacy":
        with open_dataplanes(lock_timeout, keep_copies) as dataplanes:
            yield dataplanes
        return
    kept = KeptTables()
    yield {family: NftDataplane(family, lock_timeout, kept) for family in node_families()}


def _legacy_holds_kproxy_chains() -> bool:
    """Read without libiptc (loading it costs a second) and without creating a table."""
    for family in node_families():
        proc = subprocess.run(
            [save_command("legacy", family)], capture_output=True, text=True, check=False
        )
        for table in parse_save(proc.stdout).values():
            if any(is_cleanup_chain(name) for name in table.chains):
                return True
    return False


def remove_legacy_backend(lock_timeout: float) -> list[TableReport]:
    """The iptables (and userspace) mode's chains in the legacy tables, both families."""
    if not legacy_tables_in_use() or not _legacy_holds_kproxy_chains():
        return []
    return [t for t in remove_xtables_chains(lock_timeout) if not t.empty]


def remove_nft_backend(lock_timeout: float) -> list[TableReport]:
    """The iptables mode's chains in the iptables-nft tables, both families."""
    if read_generation() is None:  # no nf_tables in this kernel: nothing there
        return []
    return [
        t
        for family in node_families()
        for t in NftDataplane(family, lock_timeout).cleanup().tables
        if not t.empty
    ]


def remove_other_backend(backend: str, lock_timeout: float) -> list[TableReport]:
    removed = (
        remove_nft_backend(lock_timeout)
        if backend == "legacy"
        else remove_legacy_backend(lock_timeout)
    )
    chains = sum(len(t.delete) for t in removed)
    if chains:
        log.info("other_backend_removed", backend=backend, chains=chains)
    return removed


def reading_backend(family: int) -> str:
    """The backend a reader (`dump`, `trace`, `dump --diff`) looks at: the one holding kproxy's
    KUBE-SERVICES, else the one the node uses."""
    for backend in ("nft", "legacy"):
        proc = subprocess.run(
            [save_command(backend, family), *(("-t", "nat") if backend == "nft" else ())],
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
        nat = parse_save(proc.stdout).get("nat")
        if nat is not None and "KUBE-SERVICES" in nat.chains:
            return backend
    return detect_backend("auto").backend


def read_backend_tables(
    family: int,
    backend: str | None = None,
    tables: tuple[str, ...] = TABLES,
    lock_timeout: float | None = None,
) -> dict[str, SavedTable]:
    """The tables kproxy writes, as `backend`'s save command prints them (None: the one a reader
    looks at). With `lock_timeout`, the legacy tables are read while holding the xtables lock,
    so that no writer is half-way through (iptables-nft needs none: each commit is one
    transaction)."""
    if (backend or reading_backend(family)) == "nft":
        return read_nft_tables(family, tables)
    if lock_timeout is None:
        return read_tables(family, tables)
    try:
        with xtables_lock(lock_timeout):
            return read_tables(family, tables)
    except OSError as exc:
        raise DataplaneError(f"cannot take the xtables lock {lock_path()}: {exc}") from exc
