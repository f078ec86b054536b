"""The nftables planner's patching path against planning afresh: after any sequence of service and
endpoint changes the patched table equals a fresh one, and the delta worked out from its
`changes` hint (and the image patched by it) equals the whole-table diff's."""

from __future__ import annotations

from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.dataplane.nftables.delta import TableImage, diff_changes, diff_tables
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.nftables import kept
from kproxy.plan.nftables import naming as n
from kproxy.plan.nftables.ir import NftTable
from kproxy.plan.nftables.kept import NftPlanCache, TablePlan
from kproxy.plan.nftables.table import plan_nft_table

NODE = NodeInfo("node-a", labels={"topology.kubernetes.io/zone": "z1"})
CONFIG = ProxyConfig(cluster_cidrs=("10.0.0.0/16",))
VIPS = ("10.96.0.1", "10.96.0.2", "10.96.0.3")  # few: services often claim one address
EXTERNAL = ("192.0.2.1", "192.0.2.2", "10.96.0.1")
NAMES = tuple(
    ServicePortName(NamespacedName("ns", f"svc-{i}"), port, proto)
    for i in range(5)
    for port, proto in (("a", Protocol.TCP), ("b", Protocol.UDP))
)

Services = dict[ServicePortName, ServicePort]
Endpoints = dict[ServicePortName, tuple[Endpoint, ...]]


@st.composite
def service_ports(draw: st.DrawFn, name: ServicePortName) -> ServicePort:
    return ServicePort(
        name=name,
        cluster_ips=(draw(st.sampled_from(VIPS)),),
        port=draw(st.sampled_from((80, 443))),
        node_port=draw(st.sampled_from((0, 0, 30001, 30002))),
        session_affinity_seconds=draw(st.sampled_from((None, None, 60))),
        external_ips=tuple(draw(st.lists(st.sampled_from(EXTERNAL), max_size=2))),
        load_balancer_ips=tuple(draw(st.lists(st.sampled_from(("198.51.100.1",)), max_size=1))),
        load_balancer_source_ranges=draw(st.sampled_from(((), ("203.0.113.0/24",)))),
        external_policy_local=draw(st.booleans()),
        internal_policy_local=draw(st.booleans()),
    )


@st.composite
def endpoint_tuples(draw: st.DrawFn) -> tuple[Endpoint, ...]:
    hosts = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4, unique=True))
    return tuple(
        Endpoint(
            f"10.0.1.{host}",
            8080,
            ready=draw(st.booleans()),
            serving=True,
            node_name=draw(st.sampled_from(("node-a", "node-b"))),
        )
        for host in sorted(hosts)
    )


@st.composite
def steps(draw: st.DrawFn) -> tuple[str, ServicePortName, object]:
    """One change: a port set or deleted, its endpoints set or deleted, or (`rebuild`) every
    map entry replaced by an equal new object, or (`swap`) two names' endpoints exchanged."""
    kind = draw(st.sampled_from(("port", "port", "no-port", "eps", "eps", "no-eps", "swap")))
    name = draw(st.sampled_from(NAMES))
    if kind == "port":
        return kind, name, draw(service_ports(name))
    if kind == "eps":
        return kind, name, draw(endpoint_tuples())
    if kind == "swap":
        return kind, name, draw(st.sampled_from(NAMES))
    return kind, name, None


def apply_step(
    step: tuple[str, ServicePortName, object], services: Services, endpoints: Endpoints
) -> None:
    kind, name, value = step
    if kind == "port":
        assert isinstance(value, ServicePort)
        services[name] = value
    elif kind == "no-port":
        services.pop(name, None)
    elif kind == "eps":
        assert isinstance(value, tuple)
        endpoints[name] = value
    elif kind == "no-eps":
        endpoints.pop(name, None)
    else:  # the same tuples under exchanged names: only their names say they changed
        assert isinstance(value, ServicePortName)
        mine, theirs = endpoints.pop(name, None), endpoints.pop(value, None)
        if theirs is not None:
            endpoints[name] = theirs
        if mine is not None:
            endpoints[value] = mine


def check_plan(
    planned: TablePlan, previous: NftTable | None, services: Services, endpoints: Endpoints
) -> None:
    fresh = plan_nft_table(services, endpoints, NODE, CONFIG)
    assert planned == fresh  # the table, and its counts
    table, changes = planned.table, planned.table.changes
    if changes is None:
        return
    assert previous is not None and changes.base() is previous
    image = TableImage.of(previous)
    assert diff_changes(table, image, changes) == diff_tables(table, image)
    image.patch(table, changes)
    assert image == TableImage.of(table)


@settings(max_examples=150, deadline=None)
@given(
    first=st.lists(steps(), max_size=12),
    rounds=st.lists(st.lists(steps(), min_size=1, max_size=4), min_size=1, max_size=6),
    in_place=st.booleans(),
    patch_min=st.sampled_from((kept.PATCH_MIN, 0)),
    splice_max=st.sampled_from((kept.SPLICE_MAX, 0)),
)
def test_patched_tables_and_deltas_equal_fresh_ones(
    first: list[tuple[str, ServicePortName, object]],
    rounds: list[list[tuple[str, ServicePortName, object]]],
    in_place: bool,
    patch_min: int,
    splice_max: int,
) -> None:
    services: Services = {}
    endpoints: Endpoints = {}
    for step in first:
        apply_step(step, services, endpoints)
    cache = NftPlanCache()
    with (
        mock.patch.object(kept, "PATCH_MIN", patch_min),
        mock.patch.object(kept, "SPLICE_MAX", splice_max),
    ):
        previous = plan_nft_table(services, endpoints, NODE, CONFIG, cache=cache)
        check_plan(previous, None, services, endpoints)
        for changes in rounds:
            if not in_place:  # as the state hands maps on: a copy, unchanged objects kept
                services, endpoints = dict(services), dict(endpoints)
            for step in changes:
                apply_step(step, services, endpoints)
            planned = plan_nft_table(services, endpoints, NODE, CONFIG, cache=cache)
            check_plan(planned, previous.table, services, endpoints)
            previous = planned


def test_one_changed_endpoint_touches_only_its_service() -> None:
    web, db = NAMES[0], NAMES[2]
    services = {
        web: ServicePort(web, ("10.96.0.1",), 80),
        db: ServicePort(db, ("10.96.0.2",), 80),
    }
    endpoints = {web: (Endpoint("10.0.1.1", 8080),), db: (Endpoint("10.0.2.1", 8080),)}
    cache = NftPlanCache()
    before = plan_nft_table(services, endpoints, NODE, CONFIG, cache=cache).table
    endpoints = {**endpoints, web: (Endpoint("10.0.1.2", 8080),)}

    after = plan_nft_table(services, endpoints, NODE, CONFIG, cache=cache).table

    assert after.changes is not None and after.changes.base() is before
    assert {c.name for c in after.changes.chains} == {
        n.service_chain(web),
        n.endpoint_chain(web, endpoints[web][0]),
    }
    assert after.changes.dropped_chains == (n.endpoint_chain(web, Endpoint("10.0.1.1", 8080)),)
    assert after.changes.elements == ()  # the service's address still leads to its chain
    delta = diff_changes(after, TableImage.of(before), after.changes)
    assert delta == diff_tables(after, TableImage.of(before))
    assert delta.unchanged_chains == len(after.chains) - 2


def test_a_new_context_plans_afresh() -> None:
    web = NAMES[0]
    services = {web: ServicePort(web, ("10.96.0.1",), 80)}
    cache = NftPlanCache()
    plan_nft_table(services, {}, NODE, CONFIG, cache=cache)

    other = plan_nft_table(services, {}, NodeInfo("node-b"), CONFIG, cache=cache)

    assert other.table.changes is None
    assert other == plan_nft_table(services, {}, NodeInfo("node-b"), CONFIG)
