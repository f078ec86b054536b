"""Pausing Python's cyclic garbage collector for the length of a sync.

A sync allocates hundreds of thousands of small immutable objects (rules, matches, entries) while
the state holds hundreds of thousands more; the collector's generational passes then repeatedly
walk that whole heap and take two thirds of planning time at 10,000 services. The objects a sync
creates form no reference cycles, so collection can wait until the sync is over.

Once the sync is over, the collector runs as usual; after a large full sync its next full pass
(0.6 s at 10,000 services) walks the new objects once. Freezing them instead (gc.freeze) would
skip that, but python-iptables' objects do hold reference cycles, which would then never be freed.
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
