"""Packet-trace tests: what a NEW connection meets in the planned rules, asserted by meaning
(which endpoints it can reach, whether it is masqueraded, rejected or dropped)."""

from __future__ import annotations

from collections import Counter

import pytest
import scenarios

from kproxy.plan.iptables import naming
from kproxy.rules import fragments as f
from kproxy.rules.ir import Chain, JumpRule, Match, Rule, Ruleset, Table, Target
from kproxy.rules.trace import (
    Hook,
    Packet,
    RecentState,
    TraceError,
    Verdict,
    possible_destinations,
    possible_outcomes,
    seeded_choice,
    trace_packet,
)

POD = "10.99.0.7"  # in the cluster CIDR, not an endpoint
OUTSIDE = "192.168.1.5"  # off-cluster client routed to the node
NODE_IP = "192.168.1.10"
SVC1_ENDPOINTS = {("10.180.0.1", 80), ("10.180.0.2", 80), ("10.180.0.3", 80)}


def to_svc1(src: str = POD, dport: int = 80, protocol: str = "tcp") -> Packet:
    return Packet(src=src, dst="172.30.0.41", protocol=protocol, dport=dport)


@pytest.fixture(scope="module")
def svc1() -> Ruleset:
    return scenarios.single_service().ruleset()


@pytest.mark.parametrize("hook", ["PREROUTING", "OUTPUT"])
def test_cluster_ip_reaches_exactly_the_endpoints(svc1: Ruleset, hook: Hook) -> None:
    src = POD if hook == "PREROUTING" else NODE_IP
    assert possible_destinations(svc1, to_svc1(src), hook) == SVC1_ENDPOINTS


def test_every_path_is_accepted_and_dnated(svc1: Ruleset) -> None:
    outcomes = possible_outcomes(svc1, to_svc1(), "PREROUTING")
    assert len(outcomes) == 3
    assert all(o.verdict is Verdict.ACCEPTED and o.dnat for o in outcomes)


def test_endpoints_are_chosen_evenly(svc1: Ruleset) -> None:
    choose = seeded_choice(7)
    hits = Counter(
        trace_packet(svc1, to_svc1(), "PREROUTING", choose=choose).dnat for _ in range(3000)
    )
    assert set(hits) == SVC1_ENDPOINTS
    assert all(850 < n < 1150 for n in hits.values()), hits


@pytest.mark.parametrize(
    "packet",
    [to_svc1(dport=81), to_svc1(protocol="udp"), Packet(POD, "172.30.0.42", "tcp", 80)],
    ids=["wrong-port", "wrong-protocol", "wrong-address"],
)
def test_other_traffic_is_not_dnated(svc1: Ruleset, packet: Packet) -> None:
    outcomes = possible_outcomes(svc1, packet, "PREROUTING")
    assert [(o.verdict, o.dnat, o.masqueraded) for o in outcomes] == [
        (Verdict.ACCEPTED, None, False)
    ]


def test_dnat_path_visits_service_then_endpoint_chain(svc1: Ruleset) -> None:
    result = trace_packet(svc1, to_svc1(), "PREROUTING", choose=lambda p: True)
    nat = svc1.table("nat")
    assert nat is not None
    svc_chain = next(c.name for c in nat.chains if c.name.startswith("KUBE-SVC-"))
    assert result.dnat == ("10.180.0.1", 80)
    assert result.visited[:4] == (
        ("nat", "PREROUTING", 0),
        ("nat", "KUBE-SERVICES", 0),
        ("nat", svc_chain, 1),  # rule 0 is the masquerade rule, which a pod source misses
        ("nat", "KUBE-SEP-SXIVWICOYRO3J4NJ", 1),
    )


@pytest.mark.parametrize("hook", ["PREROUTING", "OUTPUT"])
def test_service_without_endpoints_is_rejected_in_filter(hook: Hook) -> None:
    ruleset = scenarios.no_endpoints().ruleset()
    src = POD if hook == "PREROUTING" else NODE_IP
    for packet in (Packet(src, "172.30.0.60", "tcp", 443), Packet(src, "172.30.0.61", "udp", 53)):
        outcomes = possible_outcomes(ruleset, packet, hook)
        assert [(o.verdict, o.dnat) for o in outcomes] == [(Verdict.REJECTED, None)]
        assert ("filter", "KUBE-SERVICES", 0 if packet.dport == 53 else 1) in outcomes[0].visited
    other_port = Packet(src, "172.30.0.60", "tcp", 80)
    assert trace_packet(ruleset, other_port, hook).verdict is Verdict.ACCEPTED


def test_off_cluster_source_is_masqueraded(svc1: Ruleset) -> None:
    outcomes = possible_outcomes(svc1, to_svc1(OUTSIDE), "PREROUTING")
    assert {o.dnat for o in outcomes} == SVC1_ENDPOINTS
    assert all(o.masqueraded for o in outcomes)


def test_in_cluster_source_keeps_its_address(svc1: Ruleset) -> None:
    assert not any(o.masqueraded for o in possible_outcomes(svc1, to_svc1(POD), "PREROUTING"))


def test_hairpin_to_the_chosen_endpoint_is_masqueraded(svc1: Ruleset) -> None:
    for o in possible_outcomes(svc1, to_svc1("10.180.0.2"), "PREROUTING"):
        assert o.masqueraded == (o.dnat == ("10.180.0.2", 80)), o


def test_without_cluster_cidr_nothing_but_hairpin_is_masqueraded() -> None:
    ruleset = scenarios.multi_port().ruleset()
    packet = Packet(OUTSIDE, "172.30.0.50", "tcp", 80)
    assert not any(o.masqueraded for o in possible_outcomes(ruleset, packet, "PREROUTING"))


def test_masquerade_all_masquerades_every_source() -> None:
    ruleset = scenarios.masquerade_all().ruleset()
    for src in (POD, OUTSIDE, "10.6.0.1"):
        outcomes = possible_outcomes(ruleset, Packet(src, "172.30.0.90", "tcp", 8080), "PREROUTING")
        assert {o.dnat for o in outcomes} == {("10.6.0.1", 8080), ("10.6.0.2", 8080)}
        assert all(o.masqueraded for o in outcomes)


def test_forward_policy_drop_still_forwards_marked_service_traffic(svc1: Ruleset) -> None:
    """KUBE-FORWARD accepts what kproxy marked; unmarked pod traffic is left to the policy."""
    drop = {("filter", "FORWARD"): "DROP"}
    marked = trace_packet(svc1, to_svc1(OUTSIDE), "PREROUTING", policies=drop)
    unmarked = trace_packet(svc1, to_svc1(POD), "PREROUTING", policies=drop)
    assert (marked.verdict, unmarked.verdict) == (Verdict.ACCEPTED, Verdict.DROPPED)


def test_affinity_keeps_a_client_on_its_first_endpoint() -> None:
    ruleset = scenarios.affinity().ruleset()
    packet = Packet(POD, "172.30.0.80", "tcp", 80)
    recent = RecentState()
    first = trace_packet(ruleset, packet, "PREROUTING", recent=recent, now=100.0)
    assert first.dnat in {("10.5.0.1", 8080), ("10.5.0.2", 8080)}
    for seed in range(20):
        again = trace_packet(
            ruleset, packet, "PREROUTING", choose=seeded_choice(seed), recent=recent, now=200.0
        )
        assert again.dnat == first.dnat
    assert possible_destinations(ruleset, packet, "PREROUTING", recent=recent, now=300.0) == {
        first.dnat
    }


def test_affinity_is_per_client_and_expires() -> None:
    ruleset = scenarios.affinity().ruleset()
    both = {("10.5.0.1", 8080), ("10.5.0.2", 8080)}
    recent = RecentState()
    trace_packet(ruleset, Packet(POD, "172.30.0.80", "tcp", 80), "PREROUTING", recent=recent)
    other = Packet("10.99.0.8", "172.30.0.80", "tcp", 80)
    assert possible_destinations(ruleset, other, "PREROUTING", recent=recent) == both
    same = Packet(POD, "172.30.0.80", "tcp", 80)
    assert possible_destinations(ruleset, same, "PREROUTING", recent=recent, now=10800) != both
    assert possible_destinations(ruleset, same, "PREROUTING", recent=recent, now=10801) == both


def test_possible_outcomes_leaves_recent_state_alone() -> None:
    ruleset = scenarios.affinity().ruleset()
    recent = RecentState()
    possible_outcomes(ruleset, Packet(POD, "172.30.0.80", "tcp", 80), "PREROUTING", recent=recent)
    assert recent.lists == {}


def test_terminating_fallback_reaches_only_serving_endpoints() -> None:
    ruleset = scenarios.terminating_fallback().ruleset()
    packet = Packet(POD, "172.30.0.70", "tcp", 80)
    assert possible_destinations(ruleset, packet, "PREROUTING") == {
        ("10.4.0.1", 8080),
        ("10.4.0.3", 8080),
    }


@pytest.mark.parametrize(
    ("protocol", "port", "target"), [("tcp", 80, 8080), ("udp", 53, 5353), ("sctp", 9000, 9001)]
)
def test_multi_port_service_maps_each_port_to_its_target_port(
    protocol: str, port: int, target: int
) -> None:
    ruleset = scenarios.multi_port().ruleset()
    packet = Packet(POD, "172.30.0.50", protocol, port)
    assert possible_destinations(ruleset, packet, "PREROUTING") == {
        ("10.1.0.1", target),
        ("10.1.0.2", target),
        ("10.1.1.1", target),
    }


def test_ipv6_cluster_ip_reaches_ipv6_endpoints() -> None:
    ruleset = scenarios.dual_stack().ruleset(6)
    packet = Packet("fd00:10:1::5", "fd00:30::100", "tcp", 80)
    outcomes = possible_outcomes(ruleset, packet, "PREROUTING")
    assert {o.dnat for o in outcomes} == {("fd00:10:9::1", 8080), ("fd00:10:9::2", 8080)}
    assert not any(o.masqueraded for o in outcomes)
    outside = Packet("2001:db8::1", "fd00:30::100", "tcp", 80)
    assert all(o.masqueraded for o in possible_outcomes(ruleset, outside, "PREROUTING"))


def test_packet_to_the_node_goes_to_filter_input(svc1: Ruleset) -> None:
    result = trace_packet(
        svc1, Packet(OUTSIDE, NODE_IP, "tcp", 22), "PREROUTING", local_addresses=[NODE_IP]
    )
    assert result.verdict is Verdict.ACCEPTED
    assert (
        "filter",
        "INPUT",
        2,
    ) in result.visited  # the KUBE-EXTERNAL-SERVICES jump, last in kernel order
    assert not any(chain == "POSTROUTING" for _, chain, _ in result.visited)


# --- the tracer's own semantics, on hand-written rulesets --------------------------------------


def _nat(*chains: Chain, jumps: tuple[JumpRule, ...] = ()) -> Ruleset:
    return Ruleset(4, (Table("nat", chains, jumps),))


def test_goto_returns_to_the_caller_of_the_calling_chain() -> None:
    ruleset = _nat(
        Chain("A", (Rule(target=Target("B", goto=True)), Rule(target=f.dnat("10.0.0.1:1")))),
        Chain("B", (Rule(target=f.RETURN),)),
        jumps=(
            JumpRule("PREROUTING", Rule(target=f.dnat("10.0.0.2:2"))),
            JumpRule("PREROUTING", Rule(target=f.jump("A"))),
        ),
    )
    result = trace_packet(ruleset, Packet(POD, "10.1.1.1", "tcp", 80), "PREROUTING")
    assert result.dnat == ("10.0.0.2", 2)  # A's DNAT was skipped by the goto's return


def test_mark_is_set_and_matched() -> None:
    ruleset = _nat(
        Chain("M", (Rule(target=f.set_mark("0x4000", "0x4000")),)),
        Chain("D", (Rule(matches=(f.mark("0x4000/0x4000"),), target=f.dnat("10.0.0.3:3")),)),
        jumps=(
            JumpRule("PREROUTING", Rule(target=f.jump("D"))),
            JumpRule("PREROUTING", Rule(target=f.jump("M"))),
        ),
    )
    result = trace_packet(ruleset, Packet(POD, "10.1.1.1", "tcp", 80), "PREROUTING")
    assert (result.dnat, result.mark) == (("10.0.0.3", 3), 0x4000)


def test_unknown_match_target_and_loops_raise() -> None:
    jump = (JumpRule("OUTPUT", Rule(target=f.jump("L"))),)
    packet = Packet(NODE_IP, "10.1.1.1", "tcp", 80)
    for rules in (
        (Rule(matches=(Match("multiport", ()),)),),
        (Rule(target=Target("LOG")),),
        (Rule(target=f.jump("L")),),
    ):
        with pytest.raises(TraceError):
            trace_packet(_nat(Chain("L", rules), jumps=jump), packet, "OUTPUT")


def test_unknown_hook_raises(svc1: Ruleset) -> None:
    with pytest.raises(TraceError):
        trace_packet(svc1, to_svc1(), "INPUT")  # type: ignore[arg-type]


def test_endpoint_chain_names_in_the_trace_are_upstreams() -> None:
    """The first endpoint of ns1/svc1:p80 has the chain name upstream's own tests show."""
    ruleset = scenarios.single_service().ruleset()
    spn = next(iter(scenarios.single_service().state().services_map()))
    assert naming.service_chain(spn) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    result = trace_packet(ruleset, to_svc1(), "PREROUTING", choose=lambda p: True)
    assert ("nat", "KUBE-SEP-SXIVWICOYRO3J4NJ", 1) in result.visited


# --- NodePorts, external IPs, load balancers and traffic policies ------------------------------

BOTH = {("10.20.0.1", 8080), ("10.20.0.2", 8080)}
LOCAL_ONLY = {("10.20.0.1", 8080)}
NODE_LOCAL = [scenarios.NODE_IP, "127.0.0.1"]


def _outcomes(
    ruleset: Ruleset, src: str, dst: str, dport: int, hook: Hook = "PREROUTING"
) -> set[tuple[Verdict, tuple[str, int] | None, bool]]:
    packet = Packet(src, dst, "tcp", dport)
    return {
        (o.verdict, o.dnat, o.masqueraded)
        for o in possible_outcomes(ruleset, packet, hook, local_addresses=NODE_LOCAL)
    }


@pytest.mark.parametrize(
    ("dst", "dport"), [(scenarios.NODE_IP, 30080), ("192.0.2.10", 80), ("198.51.100.10", 80)]
)
def test_external_traffic_with_cluster_policy_is_masqueraded_to_any_endpoint(
    dst: str, dport: int
) -> None:
    ruleset = scenarios.external().ruleset()
    assert _outcomes(ruleset, OUTSIDE, dst, dport) == {(Verdict.ACCEPTED, d, True) for d in BOTH}


@pytest.mark.parametrize(
    ("dst", "dport"), [(scenarios.NODE_IP, 30080), ("192.0.2.10", 80), ("198.51.100.10", 80)]
)
def test_external_traffic_with_local_policy_keeps_its_source_and_stays_local(
    dst: str, dport: int
) -> None:
    ruleset = scenarios.external(etp="Local").ruleset()
    assert _outcomes(ruleset, OUTSIDE, dst, dport) == {
        (Verdict.ACCEPTED, d, False) for d in LOCAL_ONLY
    }


def test_local_policy_short_circuits_pod_and_host_traffic_to_all_endpoints() -> None:
    ruleset = scenarios.external(etp="Local").ruleset()
    assert {d for _, d, _ in _outcomes(ruleset, POD, "192.0.2.10", 80)} == BOTH
    host = _outcomes(ruleset, scenarios.NODE_IP, scenarios.NODE_IP, 30080, "OUTPUT")
    assert host == {(Verdict.ACCEPTED, d, True) for d in BOTH}


def test_local_policy_without_local_endpoints_drops_external_traffic() -> None:
    ruleset = scenarios.external(etp="Local", local_endpoint=False).ruleset()
    for dst, dport in ((scenarios.NODE_IP, 30080), ("192.0.2.10", 80)):
        assert _outcomes(ruleset, OUTSIDE, dst, dport) == {(Verdict.DROPPED, None, False)}


def test_internal_local_policy_uses_only_local_endpoints() -> None:
    ruleset = scenarios.external(itp="Local").ruleset()
    assert {d for _, d, _ in _outcomes(ruleset, POD, "172.30.0.110", 80)} == LOCAL_ONLY
    ruleset = scenarios.external(itp="Local", local_endpoint=False).ruleset()
    assert _outcomes(ruleset, POD, "172.30.0.110", 80) == {(Verdict.DROPPED, None, False)}


def test_load_balancer_source_ranges_admit_only_listed_sources() -> None:
    ruleset = scenarios.external(source_ranges=("192.168.1.0/24",)).ruleset()
    assert {d for _, d, _ in _outcomes(ruleset, OUTSIDE, "198.51.100.10", 80)} == BOTH
    assert _outcomes(ruleset, "203.0.113.9", "198.51.100.10", 80) == {
        (Verdict.DROPPED, None, False)
    }
    # NodePorts are not subject to the source ranges.
    assert {d for _, d, _ in _outcomes(ruleset, "203.0.113.9", scenarios.NODE_IP, 30080)} == BOTH


def test_health_check_node_port_is_accepted() -> None:
    ruleset = scenarios.external(etp="Local").ruleset()
    result = trace_packet(
        ruleset,
        Packet(OUTSIDE, scenarios.NODE_IP, "tcp", 32000),
        "PREROUTING",
        local_addresses=NODE_LOCAL,
        policies={("filter", "INPUT"): "DROP"},
    )
    assert result.verdict is Verdict.ACCEPTED
