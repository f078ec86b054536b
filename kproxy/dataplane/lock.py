"""The xtables lock: the file `iptables -w` flocks, so kproxy and other writers take turns."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kproxy.errors import TableLockedError

DEFAULT_LOCK_PATH = "/run/xtables.lock"
_POLL_SECONDS = 0.1  # `iptables -W 100000`


def lock_path() -> str:
    """The lock file iptables uses; XTABLES_LOCKFILE overrides it as it does for iptables."""
    return os.environ.get("XTABLES_LOCKFILE", DEFAULT_LOCK_PATH)


@contextmanager
def xtables_lock(timeout: float, path: str | None = None) -> Iterator[None]:
    """Hold the xtables lock, waiting up to `timeout` seconds for it."""
    path = path or lock_path()
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
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
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
