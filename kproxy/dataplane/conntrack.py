"""Stale UDP conntrack flows, found and deleted over netlink (ctnetlink.py), asking the kernel
only for the flows to the service addresses being cleaned. Which flows those are, and which of
them are stale, is decided in plan/conntrack.py; this module only asks, reads and deletes."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from kproxy.dataplane.ctnetlink import CtSocket, FlushRefused
from kproxy.plan.conntrack import CleanupReport, FlowQuery, UdpServing, is_stale, plan_queries


class ConntrackCleaner:
    """Cleans the stale UDP flows of the current network namespace, one request per query,
    starting none after the deadline (the sync loop's time allowed)."""

    def __init__(self, open_socket: Callable[[], CtSocket] = CtSocket) -> None:
        self.open_socket = open_socket
        self.can_flush = True  # until the kernel refuses to delete by filter (before 6.12)

    def clean(
        self,
        work: Mapping[int, UdpServing],
        serving: Mapping[int, UdpServing],
        deadline: float | None = None,
    ) -> CleanupReport:
        """Clean the flows of `work`'s keys, per family (what may answer them now; `serving` is
        every address served now); the report names the keys done."""
        report = CleanupReport()
        with self.open_socket() as ct:
            for family, keys in work.items():
                served = serving.get(family, {})
                queries = plan_queries(keys, served, family, self.can_flush)
                done = report.done.setdefault(family, [])
                for i, query in enumerate(queries):
                    late = deadline is not None and time.monotonic() > deadline
                    if late and any(report.done.values()):  # the first request always goes
                        report.left += sum(len(q.keys) for q in queries[i:])
                        break
                    self._run(ct, family, query, keys, served, report)
                    done.extend(query.keys)
        return report

    def _run(
        self,
        ct: CtSocket,
        family: int,
        query: FlowQuery,
        work: UdpServing,
        served: UdpServing,
        report: CleanupReport,
    ) -> None:
        if query.flush:
            try:
                ct.flush_udp(family, query.port, query.address)
                report.flushed += len(query.keys)
                return
            except FlushRefused:
                self.can_flush = False  # read and delete one by one from now on
        stale = []
        for flow in ct.dump_udp(family, query.port, query.address):
            report.read += 1
            if is_stale(flow.dst, flow.dport, flow.reply_src, work, served):
                stale.append(flow.ref)
        report.deleted += ct.delete(family, stale)
