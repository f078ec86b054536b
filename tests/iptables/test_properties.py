"""Hypothesis properties over generated clusters: planning never crashes, is deterministic,
converges (a second plan after applying is empty), names chains stably within the kernel's limit,
never jumps to a missing chain, and sends each ClusterIP:port to exactly its usable endpoints."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scenarios import Obj, Scenario, endpoint, endpoint_slice, service_port, slice_port

from kproxy.dataplane.xtables.diff import plan_table_changes
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.plan.iptables import naming
from kproxy.plan.iptables.chains import is_owned_chain
from kproxy.plan.iptables.ruleset import plan_ruleset
from kproxy.rules.ir import STANDARD_TARGETS, Ruleset
from kproxy.rules.parse import parse_rule, parse_table
from kproxy.rules.render import render_rule
from kproxy.rules.trace import Packet, Verdict, possible_outcomes

NODE = NodeInfo("node-a", labels={"topology.kubernetes.io/zone": "z1"})
POD_SOURCE = "10.250.0.1"  # a pod that is never an endpoint
EXTENSION_TARGETS = {"DNAT", "MARK", "MASQUERADE", "REJECT", "SNAT"}
PROTOCOLS = ("TCP", "UDP", "SCTP")
CNI = "*filter\n:CNI-FORWARD - [0:0]\n-A FORWARD -j CNI-FORWARD\n-A CNI-FORWARD -j ACCEPT\nCOMMIT\n"


@st.composite
def _endpoints(draw: st.DrawFn, family: int) -> list[Obj]:
    hosts = draw(st.lists(st.integers(1, 6), max_size=4))
    eps = []
    for host in hosts:
        ip = f"10.0.0.{host}" if family == 4 else f"fd00:10::{host}"
        ep = endpoint(
            ip,
            ready=draw(st.sampled_from([True, False, None])),
            serving=draw(st.sampled_from([True, False, None])),
            terminating=draw(st.sampled_from([True, False, None])),
            node=draw(st.sampled_from([None, "node-a", "node-b"])),
        )
        if draw(st.booleans()):
            ep["hints"] = {"forZones": [{"name": draw(st.sampled_from(["z1", "z2"]))}]}
        eps.append(ep)
    return eps


@st.composite
def _service(draw: st.DrawFn, index: int, simple: bool) -> tuple[Obj, list[Obj]]:
    """A Service and its EndpointSlices. `simple`: ClusterIP only, Cluster policies, no hints,
    so that the usable endpoints are exactly the ready (else serving+terminating) ones."""
    dual = draw(st.booleans())
    ips = [f"172.30.0.{index + 1}"] + ([f"fd00:30::{index + 1:x}"] if dual else [])
    # The API server refuses two ports with the same number and protocol.
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from([53, 80, 443, 8080]), st.sampled_from(PROTOCOLS)),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    names = [""] if len(pairs) == 1 else [f"p{i}" for i in range(len(pairs))]
    types = ["ClusterIP"] if simple else ["ClusterIP", "NodePort", "LoadBalancer"]
    spec: dict[str, Any] = {
        "type": draw(st.sampled_from(types)),
        "clusterIP": ips[0],
        "clusterIPs": ips,
        "ports": [service_port(n, name, p) for (n, p), name in zip(pairs, names, strict=True)],
    }
    if draw(st.booleans()):
        timeout = draw(st.integers(1, 86400))
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": timeout}}
    namespace = draw(st.sampled_from(["default", "ns1"]))
    obj: Obj = {"metadata": {"name": f"svc{index}", "namespace": namespace}, "spec": spec}
    if not simple:
        _externals(draw, obj, index)
    slice_ports = [
        slice_port(8000 + i, name, p)
        for i, ((_, p), name) in enumerate(zip(pairs, names, strict=True))
    ]
    slices = []
    for s, family in enumerate(
        draw(st.lists(st.sampled_from([4, 6] if dual else [4]), max_size=3))
    ):
        eps = draw(_endpoints(family))
        for ep in eps if simple else []:
            ep.pop("hints", None)
        address_type = "IPv4" if family == 4 else "IPv6"
        slices.append(
            endpoint_slice(
                f"svc{index}",
                f"svc{index}-{s}",
                slice_ports,
                eps,
                namespace=namespace,
                address_type=address_type,
            )
        )
    return obj, slices


def _externals(draw: st.DrawFn, obj: Obj, index: int) -> None:
    spec = obj["spec"]
    if spec["type"] != "ClusterIP":
        for i, p in enumerate(spec["ports"]):
            p["nodePort"] = 30000 + index * 10 + i
        spec["externalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
    spec["internalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
    if draw(st.booleans()):
        spec["externalIPs"] = [f"192.0.2.{index + 1}"]
    if spec["type"] == "LoadBalancer":
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": f"198.51.100.{index + 1}"}]}}
        spec["loadBalancerSourceRanges"] = draw(
            st.sampled_from([[], ["203.0.113.0/24"], ["0.0.0.0/0"], ["192.168.1.0/24"]])
        )
        if spec["externalTrafficPolicy"] == "Local":
            spec["healthCheckNodePort"] = 32000 + index


@st.composite
def clusters(draw: st.DrawFn, simple: bool = False) -> Scenario:
    count = draw(st.integers(0, 5))
    services, slices = [], []
    for i in range(count):
        svc, svc_slices = draw(_service(i, simple))
        services.append(svc)
        slices.extend(svc_slices)
    cidrs = draw(st.sampled_from([(), ("10.0.0.0/8",), ("10.0.0.0/8", "fd00:10::/64")]))
    config = ProxyConfig(cluster_cidrs=cidrs, masquerade_all=draw(st.booleans()))
    if not simple:
        config = ProxyConfig(
            cluster_cidrs=cidrs,
            masquerade_all=config.masquerade_all,
            localhost_nodeports=draw(st.booleans()),
        )
    node = NodeInfo(
        NODE.name, NODE.labels, local_addresses=("192.168.1.10", "fd00:1::10", "127.0.0.1")
    )
    return Scenario(services=services, slices=slices, config=config, node=node)


def _all_rules(ruleset: Ruleset) -> list[tuple[str, str, Any]]:
    rules = []
    for table in ruleset.tables:
        rules += [(table.name, c.name, r) for c in table.chains for r in c.rules]
        rules += [(table.name, j.chain, j.rule) for j in table.jumps]
    return rules


@given(clusters(), st.sampled_from([4, 6]))
def test_planning_never_crashes_and_every_line_parses_back(scenario: Scenario, family: int) -> None:
    ruleset = scenario.ruleset(family)
    assert ruleset.family == family
    for _, chain, rule in _all_rules(ruleset):
        line = render_rule(chain, rule)
        assert parse_rule(line) == (chain, rule)


@given(clusters(), st.sampled_from([4, 6]), st.randoms(use_true_random=False))
def test_plan_ruleset_is_deterministic(scenario: Scenario, family: int, rnd: random.Random) -> None:
    state = scenario.state()
    services, endpoints = state.services_map(), state.endpoints_map()
    first = plan_ruleset(services, endpoints, scenario.node, scenario.config, family).ruleset
    items = list(services.items())
    rnd.shuffle(items)
    again = plan_ruleset(dict(items), dict(endpoints), scenario.node, scenario.config, family)
    assert again.ruleset == first


@given(clusters(), clusters(), st.sampled_from([4, 6]))
def test_applying_converges_and_holds_exactly_the_plan(
    before: Scenario, after: Scenario, family: int
) -> None:
    dp = FakeDataplane(family)
    dp.load(CNI)
    dp.apply(before.ruleset(family))
    ruleset = after.ruleset(family)
    dp.apply(ruleset)
    held = dp.read()
    for table in ruleset.tables:
        assert plan_table_changes(table, held[table.name]).empty
        kernel = parse_table(held[table.name])
        owned = {c.name for c in kernel.chains if is_owned_chain(c.name)}
        assert owned == {c.name for c in table.chains if is_owned_chain(c.name)}
        for chain in table.chains:
            assert kernel.chain(chain.name) == chain
    assert held["filter"].chains["CNI-FORWARD"] == ["-A CNI-FORWARD -j ACCEPT"]


@given(clusters(), st.sampled_from([4, 6]))
def test_chain_names_are_stable_and_fit_the_kernel(scenario: Scenario, family: int) -> None:
    ruleset = scenario.ruleset(family)
    names = {c.name for t in ruleset.tables for c in t.chains}
    assert all(len(n) <= naming.MAX_CHAIN_NAME for n in names)
    state = scenario.state()
    services, endpoints = state.services_map(), state.endpoints_map()
    for spn, sp in services.items():
        alone = plan_ruleset({spn: sp}, endpoints, scenario.node, scenario.config, family).ruleset
        own = {c.name for t in alone.tables for c in t.chains if naming.is_service_chain(c.name)}
        assert own <= names  # a service's chains do not depend on the other services


@given(clusters(), st.sampled_from([4, 6]))
def test_every_jump_target_is_a_chain_of_the_same_table(scenario: Scenario, family: int) -> None:
    ruleset = scenario.ruleset(family)
    for table_name, chain, rule in _all_rules(ruleset):
        table = ruleset.table(table_name)
        assert table is not None
        if rule.target is None or rule.target.name in STANDARD_TARGETS | EXTENSION_TARGETS:
            continue
        assert table.chain(rule.target.name) is not None, render_rule(chain, rule)


def _usable(endpoints: tuple[Endpoint, ...], family: int) -> set[tuple[str, int]]:
    eps = [ep for ep in endpoints if ep.family == family]
    chosen = [ep for ep in eps if ep.ready] or [ep for ep in eps if ep.serving and ep.terminating]
    return {(ep.ip, ep.port) for ep in chosen}


@settings(max_examples=50)
@given(clusters(simple=True), st.sampled_from([4, 6]))
def test_cluster_ip_reaches_exactly_the_usable_endpoints(scenario: Scenario, family: int) -> None:
    ruleset = scenario.ruleset(family)
    state = scenario.state()
    endpoints = state.endpoints_map()
    source = POD_SOURCE if family == 4 else "fd00:250::1"
    for spn, sp in state.services_map().items():
        vip = next((ip for ip in sp.cluster_ips if (":" in ip) == (family == 6)), None)
        if vip is None:
            continue
        packet = Packet(source, vip, spn.protocol.lower, sp.port)
        outcomes = possible_outcomes(ruleset, packet, "PREROUTING")
        usable = _usable(endpoints.get(spn, ()), family)
        if usable:
            assert {o.dnat for o in outcomes} == usable, spn
            assert all(o.verdict is Verdict.ACCEPTED for o in outcomes)
        else:
            assert [(o.dnat, o.verdict) for o in outcomes] == [(None, Verdict.REJECTED)], spn
