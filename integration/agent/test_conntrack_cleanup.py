"""Stale UDP flow cleanup on a node with a busy conntrack table (tens of thousands of real
entries): the flows of a removed UDP service, or answered by a removed endpoint, are deleted,
exactly those, and the kernel hands kproxy no flow of any other address (the agent logs what it
read). Other services', other protocols', other ports' and foreign flows stay, entry for entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.agent_harness import AgentNode, agent_node, slice_object
from integration.conftest import both_modes
from integration.conntrack_load import FlowGroup, expected_counts, flow_counts, load_flows
from integration.manifests import service_manifest

DNS_VIP, OTHER_VIP, FOREIGN = "10.96.0.10", "10.96.0.20", "198.51.100.7"
OLD_EP, NEW_EP, OTHER_EP = "192.168.1.53", "192.168.2.53", "192.168.3.53"
# Bounds the wait for the agent's log line, generous for a loaded machine (the cleanup itself
# takes a fraction of a second here).
EVENT_BOUND = 60.0

UNRELATED = [
    FlowGroup("udp", OTHER_VIP, 53, OTHER_EP, 6_000),  # another UDP service's
    FlowGroup("tcp", DNS_VIP, 53, OLD_EP, 6_000),  # the same address and port over TCP
    FlowGroup("udp", DNS_VIP, 5353, DNS_VIP, 1_000),  # the same address, no service's port
    FlowGroup("udp", FOREIGN, 53, FOREIGN, 6_000),  # to no service at all
]


@pytest.fixture
def node(tmp_path: Path, proxy_mode: str) -> Iterator[AgentNode]:
    with agent_node("ct", tmp_path, mode=proxy_mode) as built:
        for name, vip, ep in (("dns", DNS_VIP, OLD_EP), ("other", OTHER_VIP, OTHER_EP)):
            built.api.create("Service", service_manifest(name, vip, 53, 53, "UDP"))
            built.api.create("EndpointSlice", slice_object(name, [ep], 53, "UDP"))
        yield built


@both_modes
def test_a_removed_udp_service_loses_its_flows_and_nothing_else_is_read(
    node: AgentNode, tmp_path: Path
) -> None:
    removed = FlowGroup("udp", DNS_VIP, 53, OLD_EP, 12_000)
    agent = node.start_agent()
    load_flows(node.node, [removed, *UNRELATED], tmp_path)
    before = flow_counts(node.node)
    assert before == expected_counts([removed, *UNRELATED])  # all 31,000 in the table

    node.api.delete("EndpointSlice", slice_object("dns", [OLD_EP], 53, "UDP"))
    node.api.delete("Service", service_manifest("dns", DNS_VIP, 53, 53, "UDP"))
    event = agent.wait_for_event("conntrack_flows_deleted", timeout=EVENT_BOUND)[0]
    assert flow_counts(node.node) == expected_counts(UNRELATED)
    # The kernel deleted them by filter: not one of the 31,000 flows was handed out.
    assert (event["flushed"], event["read"]) == (1, 0), event


@both_modes
def test_a_removed_endpoints_flows_go_and_only_its_services_flows_are_read(
    node: AgentNode, tmp_path: Path
) -> None:
    stale = FlowGroup("udp", DNS_VIP, 53, OLD_EP, 6_000)
    kept = FlowGroup("udp", DNS_VIP, 53, NEW_EP, 6_000)  # already answered by the new one
    agent = node.start_agent()
    load_flows(node.node, [stale, kept, *UNRELATED], tmp_path)
    assert flow_counts(node.node) == expected_counts([stale, kept, *UNRELATED])

    node.api.update("EndpointSlice", slice_object("dns", [NEW_EP], 53, "UDP"))
    event = agent.wait_for_event("conntrack_flows_deleted", timeout=EVENT_BOUND)[0]
    assert flow_counts(node.node) == expected_counts([kept, *UNRELATED])
    # The service's 12,000 flows were read (to tell the answering endpoint), nothing else.
    assert (event["count"], event["read"]) == (6_000, 12_000), event


def test_ipv6_flows_are_matched_on_the_address_here_and_only_the_services_go(
    tmp_path: Path,
) -> None:
    """IPv6: the kernel filters on protocol and port (its address filter is inverted on this
    kernel), kproxy on the address; flows to another address on the port stay."""
    from kproxy.dataplane.conntrack import ConntrackCleaner  # the installed one, in this process

    vip, other_vip = "fd00:96::10", "fd00:96::11"
    old, new = "fd00:244::5", "fd00:244::6"
    stale = FlowGroup("udp", vip, 53, old, 3_000)
    kept = FlowGroup("udp", vip, 53, new, 3_000)
    other = FlowGroup("udp", other_vip, 53, old, 3_000)
    unrelated = [
        FlowGroup("tcp", vip, 53, old, 2_000),
        FlowGroup("udp", DNS_VIP, 53, OLD_EP, 2_000),
    ]
    with agent_node("ct6", tmp_path, with_api=False) as built:
        load_flows(built.node, [stale, kept, other, *unrelated], tmp_path)
        serving = {(vip, 53): frozenset({new}), (other_vip, 53): frozenset({old})}
        cleaner = ConntrackCleaner()
        work = {6: {(vip, 53): frozenset({new})}}
        report = built.worker(built.node).call(lambda: cleaner.clean(work, {6: serving}))
        assert (report.deleted, report.read) == (3_000, 9_000), report
        assert flow_counts(built.node, 6) == expected_counts([kept, other, *unrelated], 6)
        assert flow_counts(built.node, 4) == expected_counts(unrelated, 4)
        # The other address removed: nothing may answer it, all its flows go.
        del serving[(other_vip, 53)]
        work = {6: {(other_vip, 53): frozenset()}}
        report = built.worker(built.node).call(lambda: cleaner.clean(work, {6: serving}))
        assert report.deleted == 3_000, report
        assert flow_counts(built.node, 6) == expected_counts([kept, *unrelated], 6)
