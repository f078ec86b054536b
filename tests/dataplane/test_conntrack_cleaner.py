"""The conntrack cleaner against a fake ctnetlink socket that refuses what an older kernel
refuses (deleting by filter, before Linux 6.12). With the real kernel:
integration/agent/test_conntrack_cleanup.py."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from kproxy.dataplane.conntrack import ConntrackCleaner
from kproxy.dataplane.ctnetlink import CtSocket, FlushRefused, UdpFlow


class FakeCt(CtSocket):
    """A conntrack table of UDP flows (dst, dport, reply_src); `ref` is the flow's index."""

    def __init__(self, flows: list[tuple[str, int, str]], can_flush: bool) -> None:
        self.flows = dict(enumerate(flows))
        self.can_flush = can_flush
        self.requests: list[tuple[str, int, str | None]] = []

    def close(self) -> None:
        pass

    def dump_udp(self, family: int, port: int, address: str | None) -> Iterator[UdpFlow]:
        self.requests.append(("dump", port, address))
        for i, (dst, dport, src) in list(self.flows.items()):
            if dport == port and address in (None, dst):
                yield UdpFlow(dst, dport, src, str(i).encode())

    def delete(self, family: int, refs: Iterable[bytes]) -> int:
        gone = [self.flows.pop(int(ref)) for ref in refs if int(ref) in self.flows]
        return len(gone)

    def flush_udp(self, family: int, port: int, address: str | None) -> None:
        if not self.can_flush:
            raise FlushRefused("conntrack flush by filter: Invalid argument")
        self.requests.append(("flush", port, address))
        for i, (dst, dport, _) in list(self.flows.items()):
            if dport == port and address in (None, dst):
                del self.flows[i]


FLOWS = [
    ("10.96.0.10", 53, "10.244.1.5"),
    ("10.96.0.10", 53, "10.244.1.6"),
    ("10.96.0.11", 53, "10.244.1.6"),
    ("198.51.100.7", 53, "198.51.100.7"),
]


def test_a_removed_address_is_flushed_by_the_kernel_without_reading() -> None:
    ct = FakeCt(FLOWS, can_flush=True)
    report = ConntrackCleaner(lambda: ct).clean({4: {("10.96.0.10", 53): frozenset()}}, {})
    assert ct.requests == [("flush", 53, "10.96.0.10")]
    assert (report.flushed, report.read, report.deleted) == (1, 0, 0)
    assert list(ct.flows.values()) == FLOWS[2:]


def test_an_older_kernel_refusing_to_flush_by_filter_gets_a_dump_and_deletes() -> None:
    ct = FakeCt(FLOWS, can_flush=False)
    cleaner = ConntrackCleaner(lambda: ct)
    report = cleaner.clean({4: {("10.96.0.10", 53): frozenset()}}, {})
    assert not cleaner.can_flush  # it is not asked again
    assert ct.requests == [("dump", 53, "10.96.0.10")]
    assert (report.flushed, report.read, report.deleted) == (0, 2, 2)
    assert list(ct.flows.values()) == FLOWS[2:]


def test_no_request_is_started_after_the_deadline_and_what_is_left_is_reported() -> None:
    ct = FakeCt(FLOWS, can_flush=True)
    work = {4: {("10.96.0.10", 53): frozenset(), ("10.96.0.11", 53): frozenset()}}
    report = ConntrackCleaner(lambda: ct).clean(work, {}, deadline=time.monotonic() - 1)
    assert ct.requests == [("flush", 53, "10.96.0.10")]  # one request always goes
    assert report.done == {4: [("10.96.0.10", 53)]} and report.left == 1
