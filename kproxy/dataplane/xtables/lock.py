"""The xtables lock: the file `iptables -w` flocks, so kproxy and other writers take turns."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kproxy.errors import TableLockedError

DEFAULT_LOCK_PATH = "/run/xtables.lock"
LOCK_TIMEOUT = 5.0  # seconds to wait for it, unless told (`--lock-timeout`)
_POLL_SECONDS = 0.1  # `iptables -W 100000`


def lock_path() -> str:
    """The lock file iptables uses; XTABLES_LOCKFILE overrides it as it does for iptables."""
    return os.environ.get("XTABLES_LOCKFILE", DEFAULT_LOCK_PATH)


class HeldLock:
    """The held xtables lock. flock belongs to the open file, so whoever holds the descriptor
    holds the lock: `hand_over()` passes it on (to a background reader) without a gap in which
    another writer could take it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def hand_over(self) -> HeldLock:
        fd, self._fd = self._fd, None
        if fd is None:
            raise RuntimeError("the xtables lock was already handed over")
        return HeldLock(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


@contextmanager
def xtables_lock(timeout: float, path: str | None = None) -> Iterator[HeldLock]:
    """Hold the xtables lock, waiting up to `timeout` seconds for it."""
    path = path or lock_path()
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    held = HeldLock(fd)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TableLockedError(
                        f"another program held {path} for more than {timeout:g}s; "
                        "check for a stuck iptables process or raise --lock-timeout"
                    ) from None
                time.sleep(_POLL_SECONDS)
        yield held
    finally:
        held.release()
