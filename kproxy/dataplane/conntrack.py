"""Stale UDP conntrack flows, found and deleted over netlink (pyroute2), as upstream's reconciler.
Which flows are stale is decided in plan/conntrack.py; this module only reads and deletes."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

from pyroute2 import Conntrack

from kproxy.plan.conntrack import Flow, UdpServing, stale_flows

UDP = 17


def _flows(ct: Conntrack) -> list[Flow]:
    # Filtering in the kernel by protocol returns nothing for IPv6 here, so filter in Python.
    flows = []
    for entry in list(ct.dump_entries()):
        orig, reply = entry.tuple_orig, entry.tuple_reply
        if orig is None or reply is None or orig.proto != UDP:
            continue
        flows.append(
            Flow(
                orig_dst=str(ipaddress.ip_address(orig.daddr)),
                orig_dport=int(orig.dport),
                reply_src=str(ipaddress.ip_address(reply.saddr)),
                entry=entry,
            )
        )
    return flows


def delete_stale_udp_flows(serving: Mapping[int, UdpServing]) -> list[Flow]:
    """Delete stale UDP flows in this network namespace, per family; returns what was deleted."""
    deleted = []
    for family, allowed in serving.items():
        if not allowed:
            continue
        ct = Conntrack(nfgen_family=socket.AF_INET if family == 4 else socket.AF_INET6)
        try:
            for flow in stale_flows(_flows(ct), allowed):
                ct.delete(flow.entry)
                deleted.append(flow)
        finally:
            ct.close()
    return deleted
