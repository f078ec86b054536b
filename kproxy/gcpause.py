"""Pausing Python's cyclic garbage collector while many objects that form no cycles are made:
for the length of a sync, and while a manifest file is parsed and converted.

A sync allocates hundreds of thousands of small immutable objects (rules, matches, entries) while
the state holds hundreds of thousands more; the collector's generational passes then repeatedly
walk that whole heap and take two thirds of planning time at 10,000 services. The objects a sync
creates form no reference cycles, so collection can wait until the sync is over.

Once the pause is over, the collector runs as usual. The running agent also freezes what is
alive after each full sync (sync/loop.py's freeze_heap), so later passes skip the state and the
kept plans; a cycle among them waits for the next full sync, which thaws them first.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0  # pauses in progress, in any thread
_enable_after = False  # whether the collector ran when the first of them began


@contextmanager
def gc_paused() -> Iterator[None]:
    """The collector stays off until the last of the pauses in progress ends, whichever thread
    holds them (the file source's and the sync loop's overlap), and is back on afterwards only
    if it was on when the first began."""
    global _holders, _enable_after
    with _lock:
        if _holders == 0:
            _enable_after = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _enable_after:
                gc.enable()
