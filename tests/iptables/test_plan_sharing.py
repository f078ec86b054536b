"""What the iptables plan holds is shared where rules are alike (issue 22: the plan's objects are
most of sync --once's peak beside the table blob): the same plan, in fewer objects."""

from __future__ import annotations

from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.iptables.kept import PlanCache
from kproxy.plan.iptables.ruleset import plan_ruleset
from kproxy.rules.ir import Rule

CONFIG = ProxyConfig(cluster_cidrs=("10.128.0.0/10",))
NODE = NodeInfo("node-a")


Ports = dict[ServicePortName, ServicePort]
Endpoints = dict[ServicePortName, tuple[Endpoint, ...]]


def _cluster(services: int, endpoints: int) -> tuple[Ports, Endpoints]:
    ports: Ports = {}
    eps: Endpoints = {}
    for i in range(services):
        spn = ServicePortName(NamespacedName("ns", f"svc-{i}"), "http", Protocol.TCP)
        ports[spn] = ServicePort(spn, (f"10.96.0.{i}",), 80)
        eps[spn] = tuple(
            Endpoint(f"10.{128 + j}.0.{i}", 8080, node_name="other") for j in range(endpoints)
        )
    return ports, eps


def _nat_chains(services: int, endpoints: int) -> dict[str, tuple[Rule, ...]]:
    ports, eps = _cluster(services, endpoints)
    nat = plan_ruleset(ports, eps, NODE, CONFIG).ruleset.table("nat")
    assert nat is not None
    return {chain.name: chain.rules for chain in nat.chains}


def test_a_ports_endpoint_chains_share_their_dnat_matches() -> None:
    chains = _nat_chains(1, 3)
    dnats = [rules[1] for name, rules in chains.items() if name.startswith("KUBE-SEP-")]
    assert len(dnats) == 3
    assert all(rule.matches is dnats[0].matches for rule in dnats)


def test_the_cluster_ip_rule_and_the_masquerade_rule_share_destination_and_matches() -> None:
    chains = _nat_chains(1, 1)
    (entry,) = chains["KUBE-SERVICES"][:1]
    (svc,) = (rules for name, rules in chains.items() if name.startswith("KUBE-SVC-"))
    masquerade = svc[0]
    assert masquerade.src_invert and masquerade.target is not None
    assert masquerade.target.name == "KUBE-MARK-MASQ"
    assert masquerade.dst is entry.dst and masquerade.matches is entry.matches


def test_balancing_rules_without_comments_share_their_matches() -> None:
    chains = _nat_chains(250, 5)  # 1,250 endpoints: a large cluster, no per-endpoint comments
    svcs = [rules for name, rules in chains.items() if name.startswith("KUBE-SVC-")]
    firsts = [rules[1] for rules in svcs]  # after the masquerade rule: 1 of 5
    assert all(rule.matches is firsts[0].matches for rule in firsts)


def test_ports_without_rules_in_a_family_share_one_kept_part() -> None:
    ports, eps = _cluster(3, 2)
    cache = PlanCache()
    plan_ruleset(ports, eps, NODE, CONFIG, 6, cache)  # IPv4 services: nothing in IPv6
    parts = {id(row.part) for row in cache._rows}
    assert len(cache._rows) == 3 and len(parts) == 1
