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
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
