"""The nftables dataplane (NftablesNode) against the nftables fake: what a sync sends, how it
repairs kproxy's table after another program's edit, and how a table the kernel does not hold is
written in stages. The fake sits under the real NftNetlink, so kproxy's encoding, batching, ack
handling and dump filtering all run; what the kernel holds is read back through readback.py."""

from __future__ import annotations

import copy
import errno
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables import readback, staged
from kproxy.dataplane.nftables.delta import (
    NFT_MSG_DELCHAIN,
    NFT_MSG_DELRULE,
    NFT_MSG_DELSETELEM,
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSETELEM,
    NFT_MSG_NEWTABLE,
)
from kproxy.dataplane.nftables.fake import FakeNfTables, FakeNftNetlink
from kproxy.dataplane.nftables.netlink import NLM_F_APPEND, NLM_F_CREATE, Message
from kproxy.dataplane.nftables.node import NftablesNode
from kproxy.errors import DataplaneError
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.ir import Chain, Element, Hook, NftTable, Rule, Verdict
from kproxy.plan.nftables.planner import NftablesPlan, NftablesPlanner

NODE = NodeInfo("node-a", primary_ips=("172.31.0.2",), local_addresses=("172.31.0.2",))
IP = 2  # NFPROTO_IPV4
FOREIGN = "filter"  # another program's table, beside kproxy's in the ip family


def spn(name: str) -> ServicePortName:
    return ServicePortName(NamespacedName("ns", name), "http", Protocol.TCP)


@dataclass
class Cluster:
    """Services and their endpoints, planned by the nftables planner (whose cache patches each
    plan from the last, as in the agent)."""

    planner: NftablesPlanner
    services: dict[ServicePortName, ServicePort]
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]]

    def add(self, name: str, vip: str, *ips: str, node_port: int = 0) -> None:
        sp = ServicePort(name=spn(name), cluster_ips=(vip,), port=80, node_port=node_port)
        self.services[sp.name] = sp
        self.endpoints[sp.name] = tuple(Endpoint(ip, 8080, node_name="node-a") for ip in ips)

    def plan(self) -> NftablesPlan:
        return self.planner.plan(self.services, self.endpoints, NODE, (4,))


@pytest.fixture
def nft(nft: FakeNfTables) -> FakeNfTables:
    """The fake nf_tables (conftest.py) holding another program's table."""
    kernel = nft
    other = kernel.socket()
    base = Chain("input", (), Hook("filter", "input", 0))
    other.transact(
        [
            (NFT_MSG_NEWTABLE, NLM_F_CREATE, IP, e.table_attrs(FOREIGN)),
            (NFT_MSG_NEWCHAIN, NLM_F_CREATE, IP, e.chain_attrs(FOREIGN, base)),
            (NFT_MSG_NEWCHAIN, NLM_F_CREATE, IP, e.chain_attrs(FOREIGN, Chain("KUBE-FIREWALL"))),
            rule_msg(FOREIGN, "input", Verdict("jump", "KUBE-FIREWALL")),
        ]
    )
    return kernel


@pytest.fixture
def node(nft: FakeNfTables) -> Iterator[NftablesNode]:
    dataplane = NftablesNode(nft.socket(), (4,))
    yield dataplane
    dataplane.close()


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster(NftablesPlanner(ProxyConfig()), {}, {})
    c.add("web", "10.96.0.10", "10.1.0.1", "10.1.0.2", node_port=30080)
    c.add("db", "10.96.0.20", "10.1.0.3")
    return c


def rule_msg(
    table: str, chain: str, *statements: object, first: bool = False
) -> tuple[int, int, int, bytes]:
    r = Rule(tuple(statements))  # type: ignore[arg-type]
    flags = NLM_F_CREATE if first else NLM_F_CREATE | NLM_F_APPEND
    return (NFT_MSG_NEWRULE, flags, IP, e.rule_attrs(table, chain, r, 4))


def live(nft: FakeNfTables) -> NftTable | None:
    found = readback.read_live_nft_table(4, open_netlink=nft.socket)
    assert not found.unreadable, found.unreadable
    return found.table


def assert_holds(nft: FakeNfTables, plan: NftablesPlan) -> None:
    """kproxy's table, as read back and decoded from the fake, is the plan's."""
    want = plan.kernel[4]
    have = live(nft)
    assert have is not None
    assert {c.name: c for c in have.chains} == {c.name: c for c in want.chains}
    assert {s.name: s for s in have.sets} == {s.name: s for s in want.sets}
    assert have.elements == {k: v for k, v in want.elements.items() if v}


def foreign(nft: FakeNfTables) -> object:
    return copy.deepcopy(nft.tables[(IP, FOREIGN)])


def test_a_first_sync_writes_the_plan_in_stages_then_hooks_it(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    before = foreign(nft)
    plan = cluster.plan()
    result = node.apply(plan, full=False)

    assert_holds(nft, plan)
    assert nft.commits == 1 + 2  # the foreign table's, the unhooked stage, the final one
    (table,) = result.tables
    assert table.read_kernel and sorted(table.write) == sorted(
        c.name for c in plan.kernel[4].chains
    )
    assert foreign(nft) == before


def test_the_same_plan_again_sends_nothing(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    node.apply(cluster.plan(), full=False)
    commits = nft.commits

    result = node.apply(cluster.plan(), full=False)

    assert nft.commits == commits
    assert all(t.empty and not t.read_kernel for t in result.tables)


def test_a_new_endpoint_rewrites_only_its_service(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    node.apply(cluster.plan(), full=False)
    cluster.add("web", "10.96.0.10", "10.1.0.1", "10.1.0.2", "10.1.0.9", node_port=30080)
    plan = cluster.plan()

    (table,) = node.apply(plan, full=False).tables

    assert_holds(nft, plan)
    assert not table.read_kernel
    assert n.service_chain(spn("web")) in table.write
    assert not any(spn("db").service.name in name for name in table.write), table.write


def test_a_removed_service_goes_with_its_chains_and_elements(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    node.apply(cluster.plan(), full=False)
    del cluster.services[spn("db")], cluster.endpoints[spn("db")]
    plan = cluster.plan()

    (table,) = node.apply(plan, full=False).tables

    assert_holds(nft, plan)
    assert n.service_chain(spn("db")) in table.delete


def test_a_full_sync_of_an_intact_table_reads_it_and_writes_nothing(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    node.apply(cluster.plan(), full=False)
    commits = nft.commits

    (table,) = node.apply(cluster.plan(), full=True).tables

    assert table.read_kernel and table.empty
    assert nft.commits == commits


def _edit_kproxys_table(nft: FakeNfTables, plan: NftablesPlan) -> None:
    """Another program's commit: a rule inserted, a chain flushed, a map element removed and
    one of its own added."""
    web_chain = n.service_chain(spn("web"))
    services = plan.kernel[4].elements[n.SERVICE_IPS]
    gone = next(el for el in services if el.key[0] == "10.96.0.20")
    stray = Element(("10.96.0.99", "tcp", "80"), Verdict("goto", web_chain))
    other = nft.socket()
    other.transact(
        [
            rule_msg(n.TABLE, n.SERVICES, Verdict("drop"), first=True),
            (NFT_MSG_DELRULE, 0, IP, e.rule_chain_attrs(n.TABLE, web_chain)),
            (NFT_MSG_DELSETELEM, 0, IP, *e.element_batches(n.TABLE, n.SERVICE_IPS, [gone], False)),
            (
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                IP,
                *e.element_batches(n.TABLE, n.SERVICE_IPS, [stray]),
            ),
        ]
    )


def test_another_programs_edit_of_kproxys_table_is_repaired_at_the_next_sync(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    plan = cluster.plan()
    node.apply(plan, full=False)
    before = foreign(nft)
    _edit_kproxys_table(nft, plan)

    (table,) = node.apply(cluster.plan(), full=False).tables

    assert table.read_kernel
    assert sorted(table.write) == sorted([n.SERVICES, n.service_chain(spn("web"))])
    assert table.elements_changed == 2
    assert_holds(nft, plan)
    assert foreign(nft) == before


def test_another_programs_commit_to_its_own_table_costs_no_read(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    node.apply(cluster.plan(), full=False)
    nft.socket().transact([rule_msg(FOREIGN, "KUBE-FIREWALL", Verdict("accept"))])
    commits = nft.commits

    (table,) = node.apply(cluster.plan(), full=False).tables

    assert not table.read_kernel and table.empty
    assert nft.commits == commits


def test_lost_notifications_make_the_sync_read_its_table(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    node.apply(cluster.plan(), full=False)
    nft.socket().transact([rule_msg(FOREIGN, "KUBE-FIREWALL", Verdict("accept"))])
    nft.lose_notifications()

    (table,) = node.apply(cluster.plan(), full=False).tables

    assert table.read_kernel and table.empty


def test_a_deleted_table_is_written_afresh_in_stages(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    plan = cluster.plan()
    node.apply(plan, full=False)
    nft.socket().transact([(NFT_MSG_DELTABLE, 0, IP, e.table_name_attrs(n.TABLE))])
    commits = nft.commits

    (table,) = node.apply(cluster.plan(), full=False).tables

    assert table.read_kernel and table.write
    assert nft.commits == commits + 2
    assert_holds(nft, plan)


def test_a_rehooked_base_chain_makes_the_table_written_whole(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    plan = cluster.plan()
    node.apply(plan, full=False)
    base = next(c for c in plan.kernel[4].chains if c.hook is not None)
    assert base.hook is not None
    moved = replace(base, rules=(), hook=replace(base.hook, priority=base.hook.priority + 1))
    nft.socket().transact(
        [
            (NFT_MSG_DELCHAIN, 0, IP, e.chain_name_attrs(n.TABLE, base.name)),
            (NFT_MSG_NEWCHAIN, NLM_F_CREATE, IP, e.chain_attrs(n.TABLE, moved)),
        ]
    )

    (table,) = node.apply(cluster.plan(), full=False).tables

    assert table.read_kernel
    assert_holds(nft, plan)
    held = live(nft)
    assert held is not None and held.chain(base.name) == base


def test_a_large_table_is_staged_in_several_transactions(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staged, "STAGE_MESSAGES", 10)
    for i in range(20):
        cluster.add(f"svc{i}", f"10.96.1.{i}", f"10.2.0.{i}")
    plan = cluster.plan()

    node.apply(plan, full=False)

    assert_holds(nft, plan)
    assert nft.commits > 1 + 5


def test_a_staged_table_creates_its_chains_along_with_their_rules(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each commit costs the kernel a walk of every chain of the table: the chains come in
    stage by stage with their rules, not all in the first stages before any rule."""
    monkeypatch.setattr(staged, "STAGE_MESSAGES", 10)
    for i in range(20):
        cluster.add(f"svc{i}", f"10.96.1.{i}", f"10.2.0.{i}", f"10.2.1.{i}")
    plan = cluster.plan()
    held: list[tuple[int, int]] = []  # (chains, chains with rules) after each commit
    commit = nft.apply

    def counting(messages: list[Message], port: int) -> tuple[int, int]:
        result = commit(messages, port)
        table = nft.table(IP, n.TABLE)
        if table is not None:
            held.append((len(table.chains), sum(1 for c in table.chains.values() if c.rules)))
        return result

    monkeypatch.setattr(nft, "apply", counting)

    node.apply(plan, full=False)

    assert_holds(nft, plan)
    first_rules = next(i for i, (_, filled) in enumerate(held) if filled)
    assert held[first_rules][0] < len(plan.kernel[4].chains) // 2, held


def test_a_table_larger_than_a_dump_datagram_reads_back_whole(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    for i in range(600):
        cluster.add(f"svc{i}", f"10.97.{i // 250}.{i % 250}", f"10.3.{i // 250}.{i % 250}")
    plan = cluster.plan()
    node.apply(plan, full=False)
    nft.socket().transact([rule_msg(n.TABLE, n.SERVICES, Verdict("drop"), first=True)])

    (table,) = node.apply(plan, full=False).tables

    assert table.read_kernel and table.write == [n.SERVICES]
    assert_holds(nft, plan)
    lists = nft.socket().dump(13, IP, e.element_list_attrs(n.TABLE, n.SERVICE_IPS))
    assert len(lists) > 2  # the map's elements came in several messages, as from the kernel


@pytest.mark.parametrize("refused", [0, 1, 2], ids=["first stage", "second stage", "hooking"])
def test_a_refused_stage_leaves_no_table_behind_and_the_next_sync_writes_it(
    nft: FakeNfTables,
    node: NftablesNode,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    refused: int,
) -> None:
    monkeypatch.setattr(staged, "STAGE_MESSAGES", 40)
    for i in range(5):
        cluster.add(f"svc{i}", f"10.96.1.{i}", f"10.2.0.{i}")
    plan = cluster.plan()
    before = foreign(nft)
    nft.refuse_commit(errno.ENOMEM, after=refused)

    with pytest.raises(DataplaneError, match="refused"):
        node.apply(plan, full=False)

    assert live(nft) is None
    assert foreign(nft) == before
    node.apply(plan, full=False)
    assert_holds(nft, plan)


def test_a_refused_incremental_sync_changes_nothing_and_the_next_one_reads_the_kernel(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    first = cluster.plan()
    node.apply(first, full=False)
    cluster.add("web", "10.96.0.10", "10.1.0.7", node_port=30080)
    nft.refuse_commit(errno.ENOMEM)

    with pytest.raises(DataplaneError):
        node.apply(cluster.plan(), full=False)

    assert_holds(nft, first)
    (table,) = node.apply(cluster.plan(), full=False).tables
    assert table.read_kernel
    assert_holds(nft, cluster.plan())


def test_a_plan_the_kernel_would_refuse_fails_the_sync_as_it_would(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    """The fake keeps the dataplane honest: a verdict map element going to a chain the plan
    lacks is refused as the kernel refuses it, and nothing of the sync is applied."""
    plan = cluster.plan()
    node.apply(plan, full=False)
    table = plan.kernel[4]
    broken = {**table.elements}
    broken[n.SERVICE_IPS] = broken[n.SERVICE_IPS] | {
        Element(("10.96.0.77", "tcp", "80"), Verdict("goto", "no-such-chain"))
    }
    bad = replace(plan, kernel={4: replace(table, elements=broken)})

    with pytest.raises(DataplaneError, match="No such file or directory"):
        node.apply(bad, full=False)

    assert_holds(nft, plan)


def test_cleanup_removes_kproxys_table_only(
    nft: FakeNfTables, node: NftablesNode, cluster: Cluster
) -> None:
    node.apply(cluster.plan(), full=False)
    before = foreign(nft)

    result = node.cleanup()

    assert [t.table for t in result.tables] == ["ip kube-proxy"]
    assert live(nft) is None
    assert foreign(nft) == before


def test_each_socket_is_a_program_of_its_own(nft: FakeNfTables) -> None:
    assert isinstance(nft.socket(), FakeNftNetlink)
    assert nft.socket().port != nft.socket().port
