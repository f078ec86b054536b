"""plan_ruleset, table-driven: which chains and rules a cluster state yields."""

from __future__ import annotations

import random

import pytest
import scenarios
from scenarios import Scenario, endpoint, endpoint_slice, service, service_port, slice_port

from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.plan.iptables import naming
from kproxy.plan.iptables.ruleset import LARGE_CLUSTER_ENDPOINTS, plan_ruleset
from kproxy.rules.ir import Chain, Rule, Ruleset, Table
from kproxy.rules.render import render_rule


def _nat(ruleset: Ruleset) -> Table:
    table = ruleset.table("nat")
    assert table is not None
    return table


def _filter(ruleset: Ruleset) -> Table:
    table = ruleset.table("filter")
    assert table is not None
    return table


def _chains(ruleset: Ruleset, prefix: str) -> list[Chain]:
    return [c for c in _nat(ruleset).chains if c.name.startswith(prefix)]


def _dnat_targets(ruleset: Ruleset) -> set[str]:
    return {
        r.target.opts[0].value
        for c in _chains(ruleset, "KUBE-SEP-")
        for r in c.rules
        if r.target is not None and r.target.name == "DNAT"
    }


def _one_service(*eps: dict[str, object], config: ProxyConfig | None = None) -> Scenario:
    return Scenario(
        services=[service("web", "172.30.0.10", [service_port(80, "http")])],
        slices=[endpoint_slice("web", "web-1", [slice_port(8080, "http")], list(eps))],
        config=config or ProxyConfig(),
    )


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        pytest.param(
            [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False)],
            {"10.0.0.1:8080"},
            id="ready-only",
        ),
        pytest.param(
            [
                endpoint("10.0.0.1"),
                endpoint("10.0.0.2", ready=False, serving=True, terminating=True),
            ],
            {"10.0.0.1:8080"},
            id="ready-beats-terminating",
        ),
        pytest.param(
            [
                endpoint("10.0.0.2", ready=False, serving=True, terminating=True),
                endpoint("10.0.0.3", ready=False, serving=False, terminating=True),
            ],
            {"10.0.0.2:8080"},
            id="serving-terminating-fallback",
        ),
        pytest.param(
            [endpoint("10.0.0.2", ready=False, serving=True, terminating=False)],
            set(),
            id="serving-but-not-terminating-is-not-a-fallback",
        ),
        pytest.param([endpoint("fd00::1")], set(), id="other-family-only"),
    ],
)
def test_which_endpoints_get_traffic(
    endpoints: list[dict[str, object]], expected: set[str]
) -> None:
    scenario = _one_service(*endpoints)
    if any(":" in str(ep["addresses"][0]) for ep in endpoints):  # type: ignore[index]
        scenario.slices[0]["addressType"] = "IPv6"
    ruleset = scenario.ruleset()
    assert _dnat_targets(ruleset) == expected
    if not expected:
        assert _chains(ruleset, "KUBE-SVC-") == []
        rejects = [r for r in _filter(ruleset).chain("KUBE-SERVICES").rules]  # type: ignore[union-attr]
        assert [r.comment for r in rejects] == ["default/web:http has no endpoints"]


def test_service_without_a_cluster_ip_of_the_family_is_left_out() -> None:
    ruleset = _one_service(endpoint("10.0.0.1")).ruleset(6)
    assert _chains(ruleset, "KUBE-S") == [_nat(ruleset).chain("KUBE-SERVICES")]
    assert _filter(ruleset).chain("KUBE-SERVICES") == Chain("KUBE-SERVICES")


def test_dual_stack_service_gets_one_ruleset_per_family() -> None:
    scenario = scenarios.dual_stack()
    assert _dnat_targets(scenario.ruleset(4)) == {"10.9.0.1:8080", "10.9.0.2:8080"}
    assert _dnat_targets(scenario.ruleset(6)) == {"[fd00:10:9::1]:8080", "[fd00:10:9::2]:8080"}


@pytest.mark.parametrize(
    ("config", "first_rule"),
    [
        (ProxyConfig(), None),
        (
            ProxyConfig(cluster_cidrs=("10.0.0.0/8",)),
            '-A SVC ! -s 10.0.0.0/8 -d 172.30.0.10/32 -p tcp -m comment --comment "default/web:http'
            ' cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ',
        ),
        (
            ProxyConfig(cluster_cidrs=("10.0.0.0/8",), masquerade_all=True),
            '-A SVC -d 172.30.0.10/32 -p tcp -m comment --comment "default/web:http'
            ' cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ',
        ),
        (ProxyConfig(cluster_cidrs=("fd00::/64",)), None),
    ],
    ids=["no-detector", "cluster-cidr", "masquerade-all", "cidr-of-other-family"],
)
def test_cluster_ip_masquerade_rule(config: ProxyConfig, first_rule: str | None) -> None:
    ruleset = _one_service(endpoint("10.0.0.1"), config=config).ruleset()
    (svc,) = _chains(ruleset, "KUBE-SVC-")
    rules = [render_rule("SVC", r) for r in svc.rules]
    if first_rule is None:
        assert not any("KUBE-MARK-MASQ" in line for line in rules)
    else:
        assert rules[0] == first_rule


def test_affinity_checks_come_before_the_probability_rules() -> None:
    ruleset = scenarios.affinity().ruleset()
    (svc,) = _chains(ruleset, "KUBE-SVC-")
    kinds = [
        "masq"
        if r.target and r.target.name == "KUBE-MARK-MASQ"
        else "recent"
        if r.match("recent")
        else "statistic"
        if r.match("statistic")
        else "last"
        for r in svc.rules
    ]
    assert kinds == ["masq", "recent", "recent", "statistic", "last"]
    seconds = {r.match("recent").get("seconds").value for r in svc.rules if r.match("recent")}  # type: ignore[union-attr]
    assert seconds == {"10800"}
    for sep in _chains(ruleset, "KUBE-SEP-"):
        recent = sep.rules[1].match("recent")
        assert recent is not None and recent.get("set") is not None
        assert recent.get("name").value == sep.name  # type: ignore[union-attr]


def test_probabilities_make_an_even_split() -> None:
    scenario = _one_service(*(endpoint(f"10.0.0.{i}") for i in range(1, 6)))
    (svc,) = _chains(scenario.ruleset(), "KUBE-SVC-")
    probabilities = [
        r.match("statistic").get("probability").value if r.match("statistic") else None  # type: ignore[union-attr]
        for r in svc.rules
    ]
    assert probabilities == [
        "0.20000000019",
        "0.25000000000",
        "0.33333333349",
        "0.50000000000",
        None,
    ]


def _large(total: int) -> Scenario:
    return scenarios.large_cluster(big=total - 2)


@pytest.mark.parametrize(
    ("total", "comments"), [(LARGE_CLUSTER_ENDPOINTS, True), (LARGE_CLUSTER_ENDPOINTS + 1, False)]
)
def test_large_cluster_mode_drops_per_endpoint_comments(total: int, comments: bool) -> None:
    ruleset = _large(total).ruleset()
    svc = _nat(ruleset).chain(
        naming.service_chain(
            next(s for s in _large(total).state().services_map() if s.service.name == "small")
        )
    )
    assert svc is not None
    assert (svc.rules[1].comment is not None) is comments
    assert all((c.rules[1].comment is not None) is comments for c in _chains(ruleset, "KUBE-SEP-"))
    services = _nat(ruleset).chain("KUBE-SERVICES")
    assert services is not None
    assert all(r.comment for r in services.rules)  # KUBE-SERVICES keeps its comments


def test_large_cluster_threshold_counts_only_this_familys_endpoints() -> None:
    v4 = [endpoint(f"10.7.{i // 250}.{i % 250 + 1}") for i in range(600)]
    v6 = [endpoint(f"fd00:7::{i + 1:x}") for i in range(600)]
    scenario = Scenario(
        services=[service("dual", ["172.30.2.1", "fd00:30::2:1"], [service_port(80)])],
        slices=[
            endpoint_slice("dual", "dual-v4", [slice_port(80)], v4),
            endpoint_slice("dual", "dual-v6", [slice_port(80)], v6, address_type="IPv6"),
        ],
    )
    (svc,) = _chains(scenario.ruleset(4), "KUBE-SVC-")
    assert svc.rules[0].comment is not None


def test_chain_names_are_upstreams_hashes_and_fit_the_kernel() -> None:
    ruleset = scenarios.single_service().ruleset()
    names = {c.name for t in ruleset.tables for c in t.chains}
    assert {"KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SEP-SXIVWICOYRO3J4NJ"} <= names
    assert max(len(n) for n in names) <= naming.MAX_CHAIN_NAME


def test_jump_rules_follow_upstreams_table() -> None:
    ruleset = scenarios.single_service().ruleset()
    pairs = [(j.chain, j.rule.target.name) for j in _nat(ruleset).jumps if j.rule.target]
    assert pairs == [
        ("OUTPUT", "KUBE-SERVICES"),
        ("PREROUTING", "KUBE-SERVICES"),
        ("POSTROUTING", "KUBE-POSTROUTING"),
    ]
    forward = [
        j.rule.target.name for j in _filter(ruleset).jumps if j.chain == "FORWARD" and j.rule.target
    ]
    assert forward == [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ]


def test_masquerade_bit_sets_mark_rules() -> None:
    ruleset = _one_service(endpoint("10.0.0.1"), config=ProxyConfig(masquerade_bit=15)).ruleset()
    lines = [
        render_rule(c.name, r)
        for c in _nat(ruleset).chains
        if c.name in ("KUBE-MARK-MASQ", "KUBE-POSTROUTING")
        for r in c.rules
    ]
    assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x8000/0x8000" in lines
    assert "-A KUBE-POSTROUTING -m mark ! --mark 0x8000/0x8000 -j RETURN" in lines
    assert "-A KUBE-POSTROUTING -j MARK --set-xmark 0x8000/0x0" in lines


def test_services_are_ordered_whatever_the_input_order() -> None:
    scenario = scenarios.multi_port()
    scenario.services.append(service("aaa", "172.30.0.51", [service_port(80)], namespace="ns2"))
    state = scenario.state()
    services, endpoints = state.services_map(), state.endpoints_map()
    expected = plan_ruleset(services, endpoints, NodeInfo("node-a"), scenario.config).ruleset
    items = list(services.items())
    for seed in range(5):
        random.Random(seed).shuffle(items)
        assert (
            plan_ruleset(dict(items), endpoints, NodeInfo("node-a"), scenario.config).ruleset
            == expected
        )
    comments = [r.comment for r in _nat(expected).chain("KUBE-SERVICES").rules]  # type: ignore[union-attr]
    assert comments[:3] == [f"ns2/multi:{p} cluster IP" for p in ("dns", "http", "stream")]


def test_rules_are_in_canonical_form() -> None:
    """Addresses carry their prefix length, as the kernel reports them back."""
    ruleset = scenarios.dual_stack().ruleset(6)
    for table in ruleset.tables:
        for chain in table.chains:
            for rule in chain.rules:
                for address in (rule.src, rule.dst):
                    assert address is None or "/" in address, render_rule(chain.name, rule)
                    assert isinstance(rule, Rule)
