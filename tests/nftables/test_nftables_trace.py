"""`kproxy trace` and `dump --diff` for the nftables mode, without root: the tracer over the
planned `kube-proxy` table (every outcome kind, IPv6), the decoder that reads the kernel's dump
back into the IR (checked against kproxy's own encoding), and the per-object diff."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import scenarios

from kproxy.dataplane.nftables import encode as enc
from kproxy.dataplane.nftables.decode import (
    Undecodable,
    decode_chain,
    decode_element,
    decode_rule,
    decode_set,
)
from kproxy.dataplane.nftables.expressions import expression
from kproxy.dataplane.nftables.inspection import plan_nft_diffs
from kproxy.dataplane.nftables.netlink import iter_attrs
from kproxy.inspect.trace_cmd import TraceRequest, trace_planned
from kproxy.inspect.trace_view import render_trace, trace_json
from kproxy.plan.nftables.ir import Chain, NftTable, Rule, Verdict
from kproxy.plan.nftables.trace import NftTraceTables, service_of_chain
from kproxy.rules.explain import Explanation, Outcome
from kproxy.rules.trace import Packet, TraceError

POD = "10.99.0.7"
OUTSIDE = "192.168.1.5"
NODE_IP = scenarios.NODE_IP


def nft_trace(scenario: scenarios.Scenario, request: TraceRequest, **node: object) -> Explanation:
    host = replace(scenario.node, **node) if node else scenario.node
    if not host.local_addresses:
        host = replace(host, local_addresses=(NODE_IP, "127.0.0.1"))
    config = replace(scenario.config, mode="nftables")
    return trace_planned(request, scenario.state(), host, config)


def test_dnat_shares_follow_the_numgen_cascade() -> None:
    e = nft_trace(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80", POD))
    assert e.outcome is Outcome.DNAT
    assert e.service == "ns1/svc1:p80"
    assert {b.entry for b in e.branches} == {"cluster IP"}
    dests = dict(e.destinations())
    assert set(dests) == {"10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"}
    assert all(abs(share - 1 / 3) < 1e-9 for share in dests.values())
    assert abs(sum(b.share for b in e.branches) - 1.0) < 1e-9
    assert not any(b.masqueraded for b in e.branches)
    numgen = [h.why for b in e.branches for h in b.hops if h.rule.startswith("numgen")]
    assert ("picked at random (probability 0.3333)",) in numgen
    assert ("picked at random (probability 0.5)",) in numgen
    hop = e.branches[0].hops[2]
    assert (hop.table, hop.chain, hop.kproxy) == ("kube-proxy", "services", True)
    assert hop.rule == "ip daddr . meta l4proto . th dport vmap @service-ips"


def test_walk_runs_base_chains_by_hook_and_priority() -> None:
    e = nft_trace(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80", POD))
    chains = [h.chain for h in e.branches[0].hops if not h.chain.startswith(("service-", "end"))]
    base = [c for c in chains if c.startswith(("filter-", "nat-"))]
    assert base == [
        "filter-prerouting",
        "nat-prerouting",
        "filter-forward",
        "filter-forward",
        "nat-postrouting",
    ]
    node = nft_trace(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80"))
    assert (node.hook, node.branches[0].hops[0].chain) == ("OUTPUT", "filter-output")


def test_affinity_is_said_with_its_timeout() -> None:
    e = nft_trace(scenarios.affinity(), TraceRequest("tcp", "172.30.0.80:80", POD))
    assert e.affinity_seconds == 10800
    assert len(e.destinations()) == 2
    assert "session affinity (ClientIP, 10800 s)" in render_trace(e)
    assert any(
        "remembers the client in @affinity-" in why
        for b in e.branches
        for h in b.hops
        for why in h.why
    )


@pytest.mark.parametrize(
    ("scenario", "request_", "reason"),
    [
        (
            scenarios.single_service(),
            TraceRequest("tcp", "172.30.0.41:80", OUTSIDE),
            "its source is outside 10.0.0.0/8, the pods' range (detectLocalMode)",
        ),
        (
            scenarios.masquerade_all(),
            TraceRequest("tcp", "172.30.0.90:8080", POD),
            "masqueradeAll is set",
        ),
        (
            scenarios.external(),
            TraceRequest("tcp", f"{NODE_IP}:30080", OUTSIDE),
            "it came in through a node port, external IP or load-balancer IP (policy Cluster)",
        ),
    ],
    ids=["outside-cluster-cidr", "masquerade-all", "nodeport-policy-cluster"],
)
def test_masquerade_reasons(
    scenario: scenarios.Scenario, request_: TraceRequest, reason: str
) -> None:
    e = nft_trace(scenario, request_)
    assert e.outcome is Outcome.DNAT
    assert all(b.masqueraded for b in e.branches)
    assert {b.masquerade_reason for b in e.branches} == {reason}


def test_hairpin_masquerades_only_the_branch_back_to_the_client() -> None:
    e = nft_trace(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80", "10.180.0.2"))
    by_dest = {b.destination: b for b in e.branches}
    assert by_dest["10.180.0.2:80"].masquerade_reason == (
        "hairpin: the endpoint 10.180.0.2 reaches itself via the service"
    )
    assert not by_dest["10.180.0.1:80"].masqueraded
    assert "to 10.180.0.2:80: masqueraded: hairpin" in render_trace(e)


def test_nodeport_from_outside() -> None:
    e = nft_trace(scenarios.external(), TraceRequest("tcp", f"{NODE_IP}:30080", OUTSIDE))
    assert (e.origin, e.service) == ("outside", "ns9/lb:http")
    assert {b.entry for b in e.branches} == {"node port"}
    assert set(dict(e.destinations())) == {"10.20.0.1:8080", "10.20.0.2:8080"}


def test_service_without_endpoints_is_rejected() -> None:
    e = nft_trace(scenarios.no_endpoints(), TraceRequest("tcp", "172.30.0.60:443", POD))
    assert e.outcome is Outcome.REJECTED
    stopped = e.branches[0].stopped_by or ""
    assert "@no-endpoint-services element 172.30.0.60 . tcp . 443 : goto reject-chain" in stopped
    assert "the service has no endpoints" in stopped
    assert "172.30.0.60:443: rejected (the client gets ICMP port unreachable)" in render_trace(e)


def test_other_port_of_a_cluster_ip_is_rejected() -> None:
    e = nft_trace(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:81", POD))
    assert e.outcome is Outcome.REJECTED
    assert "no service port of it is this one" in (e.branches[0].stopped_by or "")


def test_local_policy_without_local_endpoint_drops_external_traffic() -> None:
    scenario = scenarios.external(etp="Local", local_endpoint=False)
    e = nft_trace(scenario, TraceRequest("tcp", f"{NODE_IP}:30080", OUTSIDE))
    assert e.outcome is Outcome.DROPPED
    assert "has no local endpoints" in (e.branches[0].stopped_by or "")
    assert "dropped by @no-endpoint-nodeports" in render_trace(e)


def test_load_balancer_source_ranges_drop_other_sources() -> None:
    scenario = scenarios.external(source_ranges=("203.0.113.0/24",))
    denied = nft_trace(scenario, TraceRequest("tcp", "198.51.100.10:80", OUTSIDE))
    assert denied.outcome is Outcome.DROPPED
    assert "loadBalancerSourceRanges" in (denied.branches[0].stopped_by or "")
    allowed = nft_trace(scenario, TraceRequest("tcp", "198.51.100.10:80", "203.0.113.7"))
    assert allowed.outcome is Outcome.DNAT
    assert {b.entry for b in allowed.branches} == {"loadbalancer IP"}


def test_local_policy_keeps_the_client_address_and_masquerades_the_node() -> None:
    scenario = scenarios.external(etp="Local")
    e = nft_trace(scenario, TraceRequest("tcp", f"{NODE_IP}:30080", OUTSIDE))
    assert e.destinations() == [("10.20.0.1:8080", 1.0)]
    assert not any(b.masqueraded for b in e.branches)
    own = nft_trace(scenario, TraceRequest("tcp", "192.0.2.10:80"))
    assert own.origin == "node"
    assert {b.masquerade_reason for b in own.branches if b.outcome is Outcome.DNAT} == {
        "its source is one of the node's addresses (external traffic policy Local)"
    }


def test_other_traffic_is_not_a_service() -> None:
    e = nft_trace(scenarios.single_service(), TraceRequest("tcp", "8.8.8.8:53", POD))
    assert e.outcome is Outcome.UNTOUCHED
    assert e.service is None
    assert "not a Service" in render_trace(e)


def test_ipv6_cluster_ip() -> None:
    e = nft_trace(
        scenarios.dual_stack(),
        TraceRequest("tcp", "[fd00:30::100]:80", "fd00:10::7"),
        local_addresses=("fd00:1::10", "::1"),
    )
    assert (e.family, e.origin, e.outcome) == (6, "pod", Outcome.DNAT)
    assert set(dict(e.destinations())) == {"[fd00:10:9::1]:8080", "[fd00:10:9::2]:8080"}
    assert any(h.rule.startswith("ip6 daddr . meta l4proto") for h in e.branches[0].hops)


def test_header_says_other_tables_are_not_walked_and_json_carries_it() -> None:
    e = nft_trace(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80", POD))
    text = render_trace(e)
    assert text.splitlines()[1].startswith("walks kproxy's nftables table only")
    doc = json.loads(json.dumps(trace_json(e)))
    assert doc["notes"] and doc["outcome"] == "dnat" and doc["service"] == "ns1/svc1:p80"
    assert all(h["table"] == "kube-proxy" for b in doc["branches"] for h in b["hops"])


def test_a_jump_loop_is_an_error_not_a_hang() -> None:
    table = scenarios.single_service().nft_table()
    loop = Chain("a", (Rule((Verdict("jump", "a"),)),))
    chains = tuple(
        replace(c, rules=loop.rules) if c.name == "nat-prerouting" else c for c in table.chains
    )
    tables = NftTraceTables(replace(table, chains=(*chains, loop)))
    with pytest.raises(TraceError, match="deeper"):
        tables.explain(Packet(POD, "172.30.0.41", "tcp", 80), "PREROUTING", "pod", ())


def test_service_of_chain() -> None:
    assert service_of_chain("service-ULMVA6XW-ns1/svc1/tcp/p80") == "ns1/svc1:p80"
    assert service_of_chain("external-ULMVA6XW-ns1/svc1/tcp/") == "ns1/svc1"
    assert service_of_chain("services") is None


# --- the decoder: the kernel's dump back into the IR ---------------------------------------


def _tables() -> list[NftTable]:
    out = [make().nft_table(family) for make in scenarios.SCENARIOS.values() for family in (4, 6)]
    out += [
        scenarios.external(etp="Local").nft_table(),
        scenarios.external(source_ranges=("203.0.113.0/24",)).nft_table(),
        scenarios.topology().nft_table(),
    ]
    return out


def test_decoder_reads_back_every_planned_object() -> None:
    checked = 0
    for table in _tables():
        family = table.family
        for chain in table.chains:
            for rule in chain.rules:
                exprs, udata = enc.encode_rule(rule, family)
                assert decode_rule(exprs, udata, family) == rule
                checked += 1
            attrs = dict(iter_attrs(enc.chain_attrs(table.name, chain)))
            assert decode_chain(attrs, chain.rules) == chain
        for named in table.sets:
            assert decode_set(dict(iter_attrs(enc.set_attrs(table.name, named, 1)))) == named
            for element in table.elements.get(named.name, ()):
                attrs = dict(iter_attrs(dict(iter_attrs(enc.encode_element(element)))[1]))
                key = dict(iter_attrs(attrs[1]))[1]
                assert decode_element(key, attrs.get(2, b""), named) == element
    assert checked > 200


def test_decoder_refuses_what_is_not_kproxys_encoding() -> None:
    exprs, udata = enc.encode_rule(Rule((Verdict("accept"),)), 4)
    foreign = expression("counter", [("NFTA_COUNTER_BYTES", 0), ("NFTA_COUNTER_PACKETS", 0)])
    with pytest.raises(Undecodable):
        decode_rule(foreign + exprs, udata, 4)


# --- dump --diff -------------------------------------------------------------------------


def test_diff_is_empty_for_the_same_table_and_names_each_changed_object() -> None:
    before = scenarios.single_service().nft_table()
    assert plan_nft_diffs(before, before) == []
    after = scenarios.affinity().nft_table()
    diffs = {d.chain: d for d in plan_nft_diffs(after, before)}
    assert diffs["map service-ips"].change == "rewritten"
    assert any(name.startswith("set affinity-") for name in diffs)
    assert {d.change for name, d in diffs.items() if "ns1/svc1" in name} == {"removed"}
    service_map = diffs["map service-ips"].lines
    assert service_map[0] == "--- ip kube-proxy map service-ips (kernel)"
    assert any(line.startswith("+") and "172.30.0.80 . tcp . 80" in line for line in service_map)
    assert "map cluster-ips" not in diffs and "chain services" not in diffs


def test_diff_against_no_table_adds_everything_and_names_unreadable_rules() -> None:
    table = scenarios.single_service().nft_table()
    added = plan_nft_diffs(table, None)
    assert {d.change for d in added} == {"added"}
    assert len(added) == len(table.chains) + len(table.sets)
    diffs = plan_nft_diffs(table, table, {"services": ("handle 7: not one of kproxy's",)})
    assert [(d.chain, d.change) for d in diffs] == [("chain services", "rewritten")]
    assert "-\t\t# a rule kproxy cannot read (handle 7: not one of kproxy's)" in diffs[0].lines
