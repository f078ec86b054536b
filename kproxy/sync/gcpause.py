"""Pausing Python's cyclic garbage collector for the length of a sync.

A sync allocates hundreds of thousands of small immutable objects (rules, matches, entries) while
the state holds hundreds of thousands more; the collector's generational passes then repeatedly
walk that whole heap and take two thirds of planning time at 10,000 services. The objects a sync
creates form no reference cycles, so collection can wait until the sync is over.

What survives a sync (state, plan caches, the last ruleset) is then frozen (gc.freeze): still freed
by reference counting when dropped, but no longer rescanned by every later full collection, which
otherwise costs 0.6 s after each large sync. Only garbage cycles among frozen objects would escape
collection, and kproxy's model holds none.
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
        gc.freeze()
        if was_enabled:
            gc.enable()
