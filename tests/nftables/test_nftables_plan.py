"""The nftables planner and the pure parts of its dataplane (diff, message order, kernel check)."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import scenarios

from kproxy.dataplane.nftables.delta import (
    NFT_MSG_DELCHAIN,
    NFT_MSG_DELRULE,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSETELEM,
    TableImage,
    delta_messages,
    diff_tables,
    full_delta,
)
from kproxy.dataplane.nftables.node import KernelTooOldError, check_kernel
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.ir import (
    FibLocal,
    Key,
    Lookup,
    NftTable,
    NumgenZero,
    Rule,
    Update,
    Verdict,
)
from kproxy.plan.nftables.kept import NftPlanCache
from kproxy.plan.nftables.planner import NftablesPlanner
from kproxy.plan.nftables.table import plan_nft_table

NODE = NodeInfo("node-a")


def spn(name: str, port: str = "http", proto: Protocol = Protocol.TCP) -> ServicePortName:
    return ServicePortName(NamespacedName("ns", name), port, proto)


def port(name: str, vip: str = "10.96.0.10", **kw: object) -> ServicePort:
    return ServicePort(name=spn(name), cluster_ips=(vip,), port=80, **kw)  # type: ignore[arg-type]


def eps(*ips: str, node: str = "node-a") -> tuple[Endpoint, ...]:
    return tuple(Endpoint(ip, 8080, node_name=node) for ip in ips)


def table_of(
    services: list[ServicePort],
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]],
    config: ProxyConfig | None = None,
    node: NodeInfo = NODE,
    family: int = 4,
) -> NftTable:
    by_name = {sp.name: sp for sp in services}
    return plan_nft_table(by_name, endpoints, node, config or ProxyConfig(), family).table


def elements(table: NftTable, name: str) -> dict[tuple[str, ...], Verdict | None]:
    return {e.key: e.verdict for e in table.elements.get(name, frozenset())}


def test_clusterip_goes_to_its_service_chain_and_picks_endpoints_by_cascade() -> None:
    web = port("web")
    table = table_of([web], {web.name: eps("10.1.0.1", "10.1.0.2", "10.1.0.3")})

    service = n.service_chain(web.name)
    assert elements(table, n.SERVICE_IPS) == {("10.96.0.10", "tcp", "80"): Verdict("goto", service)}
    assert elements(table, n.CLUSTER_IPS) == {("10.96.0.10",): None}
    chain = table.chain(service)
    assert chain is not None
    picks = [r.statements[0] for r in chain.rules]
    # 1/3, then 1/2 of the rest, then the last: each endpoint 1/3.
    assert picks[:2] == [NumgenZero(3), NumgenZero(2)]
    assert chain.rules[-1].statements == (
        Verdict("goto", n.endpoint_chain(web.name, eps("10.1.0.3")[0])),
    )


@pytest.mark.parametrize(
    ("endpoints", "policy_local", "verdict"),
    [
        ((), False, Verdict("goto", n.REJECT_CHAIN)),
        (eps("10.1.0.1", node="node-b"), True, Verdict("drop")),
    ],
    ids=["no-endpoints-reject", "no-local-endpoints-drop"],
)
def test_service_with_nowhere_to_go_is_rejected_or_dropped(
    endpoints: tuple[Endpoint, ...], policy_local: bool, verdict: Verdict
) -> None:
    web = port("web", internal_policy_local=policy_local)
    table = table_of([web], {web.name: endpoints})

    assert elements(table, n.NO_ENDPOINT_SERVICES) == {("10.96.0.10", "tcp", "80"): verdict}
    assert n.SERVICE_IPS not in table.elements


@pytest.mark.parametrize("family", [4, 6])
def test_cluster_ips_check_sees_packets_only_after_dnat(family: int) -> None:
    """`cluster-ips-check` rejects anything still addressed to a ClusterIP. Before DNAT that is
    every connection to one, so it may be jumped to only from a base chain after DNAT: the
    forward hook (prerouting's DNAT is behind it) or output at a priority past nat-output's."""
    vip = "10.96.0.10" if family == 4 else "fd00::10"
    web = port("web", vip=vip)
    table = table_of(
        [web], {web.name: eps("10.1.0.1" if family == 4 else "fd00:1::1")}, family=family
    )
    nat_output = table.chain(n.NAT_OUTPUT)
    assert nat_output is not None and nat_output.hook is not None

    jumping = [
        chain.hook
        for chain in table.chains
        if chain.hook is not None
        and any(Verdict("jump", n.CLUSTER_IPS_CHECK) in rule.statements for rule in chain.rules)
    ]
    assert sorted(h.hook for h in jumping) == ["forward", "output"], jumping
    for hook in jumping:
        if hook.hook == "output":
            assert hook.priority > nat_output.hook.priority, hook


def test_nodeports_answer_on_primary_addresses_by_default() -> None:
    web = port("web", node_port=30080)
    with_primary = replace(NODE, primary_ips=("172.31.0.2",), local_addresses=("172.31.0.2",))

    table = table_of([web], {web.name: eps("10.1.0.1")}, node=with_primary)
    unknown = table_of([web], {web.name: eps("10.1.0.1")})

    assert elements(table, n.NODEPORT_IPS) == {("172.31.0.2",): None}
    assert elements(table, n.SERVICE_NODEPORTS) == {
        ("tcp", "30080"): Verdict("goto", n.external_chain(web.name))
    }
    # Without the Node's addresses, every local address but loopback.
    services = unknown.chain(n.SERVICES)
    assert services is not None
    assert services.rules[1].statements[0] == FibLocal(Key.DADDR)
    assert n.NODEPORT_IPS not in unknown.elements


def test_affinity_remembers_the_client_per_endpoint() -> None:
    sticky = port("sticky", session_affinity_seconds=10800)
    ep = eps("10.1.0.1")[0]
    table = table_of([sticky], {sticky.name: (ep,)})

    affinity = n.affinity_set(sticky.name, ep)
    named = table.named_set(affinity)
    assert named is not None and named.timeout == 10800 and named.dynamic
    service = table.chain(n.service_chain(sticky.name))
    endpoint = table.chain(n.endpoint_chain(sticky.name, ep))
    assert service is not None and endpoint is not None
    assert isinstance(service.rules[0].statements[0], Lookup)
    assert any(isinstance(s, Update) for r in endpoint.rules for s in r.statements)


def test_source_ranges_go_through_a_firewall_chain() -> None:
    lb = port(
        "lb",
        load_balancer_ips=("198.51.100.10",),
        load_balancer_source_ranges=("203.0.113.0/24",),
    )
    table = table_of([lb], {lb.name: eps("10.1.0.1")})

    firewall = n.firewall_chain(lb.name)
    assert elements(table, n.FIREWALL_IPS) == {
        ("198.51.100.10", "tcp", "80"): Verdict("goto", firewall)
    }
    chain = table.chain(firewall)
    assert chain is not None
    assert [r.statements[-1] for r in chain.rules] == [Verdict("return"), Verdict("drop")]


def test_two_services_claiming_one_address_and_port_keep_the_first() -> None:
    a, b = (
        port("a", external_ips=("192.0.2.1",)),
        port("b", "10.96.0.11", external_ips=("192.0.2.1",)),
    )
    table = table_of([a, b], {a.name: eps("10.1.0.1"), b.name: eps("10.1.0.2")})

    assert elements(table, n.SERVICE_IPS)[("192.0.2.1", "tcp", "80")] == Verdict(
        "goto", n.external_chain(a.name)
    )


def test_names_follow_upstream_and_stay_loadable() -> None:
    web = spn("web")
    v6 = Endpoint("fd00::1", 8080)

    assert n.service_chain(web).startswith("service-")
    assert n.service_chain(web).endswith("-ns/web/tcp/http")
    assert n.endpoint_chain(web, v6).endswith("__fd00..1/8080")
    long = spn("x" * 300)
    assert len(n.endpoint_chain(long, v6)) <= n.MAX_NAME


def test_plans_are_pure_and_the_cache_changes_nothing() -> None:
    state = scenarios.external(source_ranges=("203.0.113.0/24",)).state()
    services, endpoints = state.services_map(), state.endpoints_map()
    cache = NftPlanCache()

    first = plan_nft_table(services, endpoints, NODE, ProxyConfig(), 4, cache).table
    again = plan_nft_table(services, endpoints, NODE, ProxyConfig(), 4, cache).table
    fresh = plan_nft_table(services, endpoints, NODE, ProxyConfig(), 4).table

    assert first == again == fresh


def test_planner_plans_each_family() -> None:
    state = scenarios.dual_stack().state()
    plan = NftablesPlanner(ProxyConfig()).plan(
        state.services_map(), state.endpoints_map(), NODE, (4, 6)
    )

    assert plan.mode == "nftables"
    assert {t.nft_family for t in plan.kernel.values()} == {"ip", "ip6"}
    assert plan.sysctls == ()  # no route_localnet: no localhost NodePorts in this mode


def test_a_second_sync_of_the_same_plan_sends_nothing() -> None:
    table = scenarios.affinity().nft_table()

    assert diff_tables(table, TableImage.of(table)).empty
    assert list(delta_messages(diff_tables(table, TableImage.of(table)), iter(range(1, 99)))) == []


def test_one_endpoint_more_rewrites_only_that_service() -> None:
    web, other = port("web"), port("other", "10.96.0.11")
    before = table_of([web, other], {web.name: eps("10.1.0.1"), other.name: eps("10.2.0.1")})
    after = table_of(
        [web, other], {web.name: eps("10.1.0.1", "10.1.0.2"), other.name: eps("10.2.0.1")}
    )

    delta = diff_tables(after, TableImage.of(before))

    assert [c.name for c in delta.rewrite_chains] == [n.service_chain(web.name)]
    assert [c.name for c in delta.add_chains] == [n.endpoint_chain(web.name, eps("10.1.0.2")[0])]
    assert not delta.delete_chains and not delta.add_elements and not delta.delete_elements


def test_a_removed_service_loses_its_elements_before_its_chains() -> None:
    web = port("web")
    before = table_of([web], {web.name: eps("10.1.0.1")})
    after = table_of([], {})

    kinds = [
        m[0] for m in delta_messages(diff_tables(after, TableImage.of(before)), iter(range(9)))
    ]

    assert kinds.index(NFT_MSG_DELRULE) < kinds.index(NFT_MSG_DELCHAIN)
    assert kinds.index(NFT_MSG_DELSETELEM) < kinds.index(NFT_MSG_DELCHAIN)


def test_a_first_write_creates_chains_before_rules_and_elements() -> None:
    table = scenarios.single_service().nft_table()

    kinds = [m[0] for m in delta_messages(full_delta(table), iter(range(1, 99)))]

    assert kinds.index(NFT_MSG_NEWCHAIN) < kinds.index(NFT_MSG_NEWRULE)
    last_chain = len(kinds) - 1 - kinds[::-1].index(NFT_MSG_NEWCHAIN)
    assert last_chain < kinds.index(NFT_MSG_NEWSETELEM)


@pytest.mark.parametrize(
    ("release", "ok"), [("5.10.0-28-amd64", False), ("5.13.0", True), ("6.18.44-fc", True)]
)
def test_kernels_older_than_5_13_are_refused_with_a_clear_error(release: str, ok: bool) -> None:
    if ok:
        check_kernel(release)
        return
    with pytest.raises(KernelTooOldError, match=r"needs kernel >= 5\.13.*mode: iptables"):
        check_kernel(release)


def test_the_rule_count_is_the_tables() -> None:
    state = scenarios.external(etp="Local").state()
    plan = NftablesPlanner(ProxyConfig()).plan(
        state.services_map(), state.endpoints_map(), NODE, (4,)
    )

    assert plan.stats.rules["kube-proxy"] == sum(len(c.rules) for c in plan.kernel[4].chains)


def test_chain_hashes_are_base32_of_sha256() -> None:
    import base64
    import hashlib

    text = "ns/web/tcp/http"
    expected = base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:8]

    assert n.port_base(spn("web")) == f"{expected}-{text}"


@pytest.mark.parametrize("affinity", [None, 10800], ids=["plain", "affinity"])
def test_chains_kept_as_values_equal_the_same_rules_written_out(affinity: int | None) -> None:
    """Endpoint and service chains keep their rules as the values they are made of: such a
    chain equals (and hashes as) one holding the same rules written out, and differs from one
    whose rules differ, whichever side holds which form."""
    web = port("web", session_affinity_seconds=affinity)
    endpoints = {web.name: eps("10.1.0.1", "10.1.0.2")}
    table = table_of([web], endpoints)
    other = table_of([web], {web.name: eps("10.1.0.1", "10.1.0.3")})

    for chain in table.chains:
        written = replace(chain, rules=tuple(chain.rules))
        assert chain == written and written == chain and hash(chain) == hash(written)
        assert len(chain.rules) == len(written.rules)
        assert list(chain.rules[::-1]) == list(written.rules)[::-1]
    service = table.chain(n.service_chain(web.name))
    changed = other.chain(n.service_chain(web.name))
    assert service is not None and changed is not None
    assert service != changed and changed != replace(service, rules=tuple(service.rules))
    assert service == table_of([web], endpoints).chain(service.name)


def test_endpoint_and_service_chains_keep_no_rule_objects() -> None:
    """What the plan keeps per endpoint (for every later sync) is its values, not ten small
    objects: the rules of endpoint and service chains are made when read."""
    web = port("web")
    table = table_of([web], {web.name: eps("10.1.0.1", "10.1.0.2")})

    service = n.service_chain(web.name)
    kept = [c for c in table.chains if c.name == service or c.name.startswith(n.ENDPOINT_PREFIX)]
    assert len(kept) == 3
    for chain in kept:
        assert not [o for o in gc.get_referents(chain.rules) if isinstance(o, Rule)], chain.name
        assert all(isinstance(r, Rule) for r in chain.rules)
