"""The kernel's image of a table, read in a node namespace: traffic that moves the counters leaves
it matching, a same-size replace of a rule by another program does not (the change a fingerprint
of entry count and size cannot see)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from integration.agent_harness import NetnsWorker
from integration.netns import Topology, topology
from kproxy.dataplane.xtables.kernel_image import ImageMatch, TableImage, fingerprint, read_image


@pytest.fixture
def node() -> Iterator[Topology]:
    with topology("image") as topo:
        yield topo


def _image(worker: NetnsWorker, table: str) -> TableImage:
    image = worker.call(lambda: read_image(4, table))
    assert image is not None
    return image


def _send_udp() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(3):
            sock.sendto(b"x", ("127.0.0.1", 9))


def test_counters_move_rules_do_not(node: Topology) -> None:
    ns, worker = node.node, NetnsWorker(node.node.name)
    try:
        # First in OUTPUT: rule 1 is then ours, not the node's kubelet's.
        ns.run("iptables-legacy", "-w", "-I", "OUTPUT", "1", "-d", "127.0.0.1/32", "-j", "ACCEPT")
        before = _image(worker, "filter")
        kept = ImageMatch(before)
        worker.call(_send_udp)  # counted by the rule above
        moved = _image(worker, "filter")
        assert moved.entries != before.entries  # the counters moved
        assert kept.matches(moved)

        ns.run("iptables-legacy", "-w", "-R", "OUTPUT", "1", "-d", "127.0.0.2/32", "-j", "ACCEPT")
        replaced = _image(worker, "filter")
        assert replaced.fingerprint == kept.fingerprint  # what a fingerprint alone would trust
        assert worker.call(lambda: fingerprint(4, "filter")) == kept.fingerprint
        assert not kept.matches(replaced)
    finally:
        worker.close()
