"""A partial sync with nothing to write takes no xtables lock, in a node namespace: in the agent
the IPv6 process's apply of an unchanged ruleset waited for the lock the IPv4 background reader
holds after each commit (0.6 s at 10,000 services). A table changed behind kproxy's back still
takes the locked way, and is repaired."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.agent_harness import NetnsWorker
from integration.netns import Topology, topology
from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.xtables.backend import IptablesDataplane
from kproxy.dataplane.xtables.lock import xtables_lock
from kproxy.errors import TableLockedError
from kproxy.model.config import ProxyConfig
from kproxy.model.convert import EndpointSliceInfo, EndpointSlicePort
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.iptables.planner import IptablesPlanner
from kproxy.rules.ir import Ruleset
from kproxy.state.cluster import ClusterState
from kproxy.sync.modes import MODES


@pytest.fixture
def node() -> Iterator[Topology]:
    with topology("idlelock") as topo:
        yield topo


def _ruleset() -> Ruleset:
    """One ClusterIP service with two endpoints, planned for IPv4."""
    state = ClusterState()
    key = NamespacedName("default", "web")
    spn = ServicePortName(key, "http", Protocol.TCP)
    state.set_service(key, [ServicePort(spn, ("10.96.0.10",), 80)])
    state.set_slice(
        EndpointSliceInfo(
            key=NamespacedName("default", "web-abcde"),
            service=key,
            address_type="IPv4",
            ports=(EndpointSlicePort("http", 8080, Protocol.TCP),),
            endpoints=(Endpoint("10.128.0.1", 0), Endpoint("10.128.0.2", 0)),
        )
    )
    config = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
    plan = IptablesPlanner(config).plan(
        state.services_map(), state.endpoints_map(), NodeInfo(name="node"), (4,)
    )
    ruleset: Ruleset = plan.kernel[4]
    return ruleset


def test_nothing_to_write_takes_no_lock(
    node: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = str(tmp_path / "xtables.lock")
    monkeypatch.setenv("XTABLES_LOCKFILE", lock)  # read by kproxy and iptables-legacy alike
    worker = NetnsWorker(node.node.name)
    dp = worker.call(lambda: IptablesDataplane(4, lock_timeout=0.5))
    try:
        ruleset = _ruleset()
        worker.call(lambda: dp.apply(ruleset, True))
        worker.call(dp.close)  # the background reader's hold of the lock ends

        with xtables_lock(1.0, lock):  # another writer (or the other family) holds the lock
            idle = worker.call(lambda: dp.apply(_ruleset(), False))
        assert idle.tables and all(t.empty and not t.read_kernel for t in idle.tables)

        node.node.run("iptables-legacy", "-w", "-t", "nat", "-F", "KUBE-SERVICES")
        with xtables_lock(1.0, lock), pytest.raises(TableLockedError):
            worker.call(lambda: dp.apply(_ruleset(), False))  # the flush must be repaired
        repaired = worker.call(lambda: dp.apply(_ruleset(), False))
        assert repaired.read_kernel and repaired.chains_written >= 1
        saved = node.node.run("iptables-legacy-save", "-t", "nat").stdout
        assert "-A KUBE-SERVICES -d 10.96.0.10/32" in saved
    finally:
        worker.call(dp.close)
        worker.close()


def _sync_and_try_lock(lock: str, once: bool) -> tuple[list[str], bool]:
    """One apply through the mode's own opening; the tables kept for a next sync, and whether
    the xtables lock is free right after the apply returned."""
    config = ProxyConfig(iptables_backend="legacy")
    with MODES["iptables"].open_dataplane(config, 0.5, once=once) as mode:
        assert isinstance(mode, IptablesNode)
        v4 = mode.dataplanes[4]
        assert isinstance(v4, IptablesDataplane)
        v4.apply(_ruleset(), True)
        try:
            with xtables_lock(0.0, lock):
                free = True
        except TableLockedError:
            free = False
        return sorted(v4._tables.kept_names()), free


def test_a_single_sync_keeps_no_copy_and_holds_no_lock_after_it(
    node: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sync --once` exits after its commit: the background re-read of each committed table
    (kept for the agent's next sync, about twice the table's size) is never started."""
    lock = str(tmp_path / "xtables.lock")
    monkeypatch.setenv("XTABLES_LOCKFILE", lock)
    worker = NetnsWorker(node.node.name)
    try:
        kept, free = worker.call(lambda: _sync_and_try_lock(lock, once=True))
        assert kept == [] and free
        kept, _ = worker.call(lambda: _sync_and_try_lock(lock, once=False))
        assert kept == ["filter", "mangle", "nat"]  # the agent keeps them
    finally:
        worker.close()
