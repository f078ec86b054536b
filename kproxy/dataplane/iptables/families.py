"""The dataplanes of a node: one per address family it has."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kproxy.dataplane.base import Dataplane
from kproxy.dataplane.host import ipv6_supported
from kproxy.dataplane.iptables.backend import IptablesDataplane
from kproxy.dataplane.iptables.family_process import FamilyProcess


@contextmanager
def open_dataplanes(lock_timeout: float) -> Iterator[dict[int, Dataplane]]:
    """IPv4 in this process; IPv6, when the namespace has it, in a process of its own (see
    family_process.py for why one process cannot hold both)."""
    v4 = IptablesDataplane(4, lock_timeout)
    dataplanes: dict[int, Dataplane] = {4: v4}
    v6 = FamilyProcess(6, lock_timeout) if ipv6_supported() else None  # starts in the background
    if v6 is not None:
        dataplanes[6] = v6
    try:
        yield dataplanes
    finally:
        v4.close()
        if v6 is not None:
            v6.close()
