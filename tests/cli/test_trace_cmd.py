"""`kproxy trace` without root: the explanation of planned rules (and of iptables-save text as
the live path reads it), its text and JSON, for every outcome kind; golden output for the seed
scenario."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import scenarios
from click.testing import CliRunner

from kproxy.cli import cli
from kproxy.dataplane.iptables.inspection import iptables_plan_tables
from kproxy.dataplane.xtables.preview import tables_from_saved
from kproxy.errors import DataplaneError, InvalidObjectError
from kproxy.inspect.trace_cmd import TraceInputError, TraceRequest, explain, trace_planned
from kproxy.inspect.trace_view import render_trace, trace_json
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.rules.explain import Outcome
from kproxy.rules.render import render_ruleset
from kproxy.rules.saved import parse_save
from kproxy.sync.modes import proxy_mode
from kproxy.watch.manifests import load_manifests, state_from_manifests

REPO = Path(__file__).parents[2]
SEED = REPO / "integration" / "scenarios"
SEED_NODE = NodeInfo("node-1", local_addresses=("172.31.0.2", "127.0.0.1"))
# kubeadm with a pod network of 192.168.0.0/16 (the seed's endpoints are in it).
SEED_CONFIG = ProxyConfig(cluster_cidrs=("192.168.0.0/16",))
POD = "10.99.0.7"
OUTSIDE = "192.168.1.5"
NODE_IP = scenarios.NODE_IP


def _fail(exc: InvalidObjectError) -> None:
    raise AssertionError(exc)


def seed_trace(request: TraceRequest, *dirs: str, config: ProxyConfig = SEED_CONFIG) -> str:
    manifests = load_manifests(SEED / dirs[0])
    for extra in dirs[1:]:
        more = load_manifests(SEED / extra)
        manifests.services += more.services
        manifests.endpoint_slices += more.endpoint_slices
    state = state_from_manifests(manifests, _fail)
    return render_trace(trace_planned(request, state, SEED_NODE, config))


def assert_trace_golden(name: str, text: str) -> None:
    path = scenarios.GOLDEN / f"{name}.trace"
    if os.environ.get("KPROXY_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.exists(), f"{path} missing: generate it with KPROXY_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text()


@pytest.mark.parametrize(
    ("name", "request_", "dirs"),
    [
        (
            "trace_my_nginx_from_pod",
            TraceRequest("tcp", "10.104.164.89:80", "192.168.9.9"),
            ["demo"],
        ),
        ("trace_kube_dns_udp", TraceRequest("udp", "10.96.0.10:53", "192.168.9.9"), ["demo"]),
        (
            "trace_ingress_nodeport_from_outside",
            TraceRequest("tcp", "172.31.0.2:30189", "172.31.0.1"),
            ["ingress"],
        ),
    ],
)
def test_seed_scenario_traces_match_golden(
    name: str, request_: TraceRequest, dirs: list[str]
) -> None:
    assert_trace_golden(name, seed_trace(request_, *dirs))


def planned(scenario: scenarios.Scenario, request: TraceRequest, **node: object):  # type: ignore[no-untyped-def]
    state = scenario.state()
    host = replace(scenario.node, **node) if node else scenario.node
    if not host.local_addresses:
        host = replace(host, local_addresses=(NODE_IP, "127.0.0.1"))
    return trace_planned(request, state, host, scenario.config)


def test_dnat_branches_carry_their_shares_and_sum_to_one() -> None:
    e = planned(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80", POD))
    assert e.outcome is Outcome.DNAT
    assert e.service == "ns1/svc1:p80"
    dests = dict(e.destinations())
    assert set(dests) == {"10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"}
    assert all(abs(share - 1 / 3) < 1e-6 for share in dests.values())
    assert abs(sum(b.share for b in e.branches) - 1.0) < 1e-9
    assert e.origin == "pod"
    assert not any(b.masqueraded for b in e.branches)


def test_outside_source_is_masqueraded_because_of_the_cluster_cidr() -> None:
    e = planned(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80", OUTSIDE))
    assert e.origin == "outside"
    assert all(b.masqueraded for b in e.branches)
    assert {b.masquerade_reason for b in e.branches} == {
        "its source is outside 10.0.0.0/8, the pods' range (detectLocalMode)"
    }


def test_hairpin_masquerades_only_the_branch_back_to_the_client() -> None:
    e = planned(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80", "10.180.0.2"))
    by_dest = {b.destination: b for b in e.branches}
    assert by_dest["10.180.0.2:80"].masqueraded
    assert "hairpin" in (by_dest["10.180.0.2:80"].masquerade_reason or "")
    assert not by_dest["10.180.0.1:80"].masqueraded
    assert "to 10.180.0.2:80: masqueraded: hairpin" in render_trace(e)


def test_masquerade_all_is_named() -> None:
    e = planned(scenarios.masquerade_all(), TraceRequest("tcp", "172.30.0.90:8080", POD))
    assert {b.masquerade_reason for b in e.branches} == {"masqueradeAll is set"}


def test_nodeport_from_outside_is_masqueraded_for_policy_cluster() -> None:
    e = planned(scenarios.external(), TraceRequest("tcp", f"{NODE_IP}:30080", OUTSIDE))
    assert e.outcome is Outcome.DNAT
    assert {b.entry for b in e.branches} == {"node port"}
    assert all("node port" in (b.masquerade_reason or "") for b in e.branches)


def test_service_without_endpoints_is_rejected() -> None:
    e = planned(scenarios.no_endpoints(), TraceRequest("tcp", "172.30.0.60:443", POD))
    assert e.outcome is Outcome.REJECTED
    text = render_trace(e)
    assert "rejected (the client gets ICMP port unreachable)" in text
    assert "has no endpoints" in text


def test_local_policy_without_local_endpoint_drops_external_traffic() -> None:
    scenario = scenarios.external(etp="Local", local_endpoint=False)
    e = planned(scenario, TraceRequest("tcp", f"{NODE_IP}:30080", OUTSIDE))
    assert e.outcome is Outcome.DROPPED
    assert "has no local endpoints" in render_trace(e)


def test_health_check_node_port_is_accepted() -> None:
    scenario = scenarios.external(etp="Local")
    e = planned(scenario, TraceRequest("tcp", f"{NODE_IP}:32000", OUTSIDE))
    assert e.outcome is Outcome.ACCEPTED
    assert e.service == "ns9/lb:http"


def test_other_traffic_is_not_a_service() -> None:
    e = planned(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:81", POD))
    assert e.outcome is Outcome.UNTOUCHED
    assert "not a Service" in render_trace(e)


def test_affinity_is_reported_with_its_timeout() -> None:
    e = planned(scenarios.affinity(), TraceRequest("tcp", "172.30.0.80:80", POD))
    assert e.affinity_seconds == 10800
    assert "session affinity (ClientIP, 10800 s)" in render_trace(e)


def test_ipv6_cluster_ip() -> None:
    e = planned(
        scenarios.dual_stack(),
        TraceRequest("tcp", "[fd00:30::100]:80", "fd00:10::7"),
        local_addresses=("fd00:1::10", "::1"),
    )
    assert e.family == 6
    assert set(dict(e.destinations())) == {"[fd00:10:9::1]:8080", "[fd00:10:9::2]:8080"}
    assert e.origin == "pod"


def test_node_origin_walks_nat_output() -> None:
    e = planned(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80"))
    assert (e.hook, e.origin, e.packet.src) == ("OUTPUT", "node", NODE_IP)
    assert e.branches[0].hops[0].chain == "OUTPUT"
    # The node's address is outside the cluster CIDR: masqueraded.
    assert all(b.masqueraded for b in e.branches)


FOREIGN = """*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A PREROUTING -m comment --comment "a CNI rule" -m set --match-set cni-ips src -j ACCEPT
-A PREROUTING -f -j ACCEPT
-A POSTROUTING -s 10.99.0.0/16 ! -d 10.99.0.0/16 -j MASQUERADE
COMMIT
*filter
:FORWARD DROP [0:0]
-A FORWARD -s 10.99.0.0/16 -j ACCEPT
COMMIT
"""


def live_tables(text: str, family: int = 4):  # type: ignore[no-untyped-def]
    return tables_from_saved(parse_save(text), family)


def test_untouched_packet_names_the_foreign_rules_it_passed() -> None:
    tables = live_tables(FOREIGN + render_ruleset(scenarios.single_service().ruleset()))
    e = explain(TraceRequest("tcp", "8.8.8.8:53", POD), tables, (NODE_IP,))
    assert e.outcome is Outcome.UNTOUCHED
    assert e.foreign_rules() == [
        "-A FORWARD -s 10.99.0.0/16 -j ACCEPT",
        "-A POSTROUTING -s 10.99.0.0/16 ! -d 10.99.0.0/16 -j MASQUERADE",
    ]
    text = render_trace(e)
    assert "rules of other programs it passed:" in text
    assert "[not kproxy's]" in text
    # The rule with a match the tracer lacks, and the one the IR cannot hold, are named.
    assert "-m set --match-set cni-ips src" in text
    assert "-A PREROUTING -f -j ACCEPT" in text


def test_forward_policy_drop_is_reported() -> None:
    tables = live_tables(FOREIGN + render_ruleset(scenarios.single_service().ruleset()))
    e = explain(TraceRequest("tcp", "8.8.8.8:53", "10.1.0.9"), tables, (NODE_IP,))
    assert e.outcome is Outcome.DROPPED
    assert "dropped by the DROP policy of filter FORWARD" in render_trace(e)


def test_json_output_holds_the_verdict_and_every_hop() -> None:
    e = planned(scenarios.single_service(), TraceRequest("tcp", "172.30.0.41:80", OUTSIDE))
    doc = json.loads(json.dumps(trace_json(e)))
    assert doc["outcome"] == "dnat"
    assert doc["service"] == "ns1/svc1:p80"
    assert doc["masqueraded"] is True
    assert len(doc["branches"]) == 3
    assert doc["branches"][0]["hops"][0]["chain"] == "PREROUTING"
    assert all(h["kproxy"] for b in doc["branches"] for h in b["hops"])


def test_userspace_trace_ends_at_the_relay_with_its_endpoints() -> None:
    scenario = scenarios.single_service()
    config = replace(scenario.config, mode="userspace")
    node = replace(scenario.node, local_addresses=(NODE_IP, "127.0.0.1"))
    e = trace_planned(TraceRequest("tcp", "172.30.0.41:80", POD), scenario.state(), node, config)
    assert e.outcome is Outcome.RELAYED
    relay = e.branches[0].relay
    assert relay is not None
    assert relay.endpoints == ("10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80")
    assert "relayed by kproxy's userspace listener" in render_trace(e)


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (TraceRequest("tcp", "10.0.0.1"), "expected ADDRESS:PORT"),
        (TraceRequest("tcp", "10.0.0.1:0"), "is not 1-65535"),
        (TraceRequest("tcp", "1.2.3:80"), "'1.2.3' is not an IP address"),
        (TraceRequest("tcp", "[fd00::zz]:80"), "'fd00::zz' is not an IP address"),
        (TraceRequest("tcp", "10.0.0.1:http"), "'http' is not a port number"),
        (TraceRequest("tcp", "10.0.0.1:80", "fd00::1"), "different families"),
        (TraceRequest("tcp", "10.0.0.1:80", "pod-a"), "not an IP address"),
        (TraceRequest("icmp", "10.0.0.1:80"), "use tcp, udp or sctp"),
    ],
)
def test_bad_requests_say_what_is_wrong(request_: TraceRequest, problem: str) -> None:
    tables = iptables_plan_tables(_plan(scenarios.single_service()), 4)
    with pytest.raises(TraceInputError, match=problem):
        explain(request_, tables, (NODE_IP,))


def _plan(scenario: scenarios.Scenario):  # type: ignore[no-untyped-def]
    state = scenario.state()
    mode = proxy_mode(scenario.config)
    return mode.planner(scenario.config).plan(
        state.services_map(), state.endpoints_map(), scenario.node, (4,)
    )


def test_cli_trace_with_manifests_needs_no_root() -> None:
    result = CliRunner().invoke(
        cli,
        [
            "trace",
            "udp",
            "10.96.0.10:53",
            "--from",
            "192.168.9.9",
            "--manifests",
            str(SEED / "demo"),
            "--hostname-override",
            "node-1",
            "--node-address",
            "172.31.0.2",
            "--output",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["service"] == "kube-system/kube-dns:dns"
    assert doc["destinations"] == [{"destination": "192.168.1.2:53", "share": 1.0}]


def test_live_trace_without_root_says_to_use_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    result = CliRunner().invoke(cli, ["trace", "tcp", "10.96.0.1:443", "--node-address", NODE_IP])
    assert isinstance(result.exception, DataplaneError)
    assert "needs root" in str(result.exception) and "--manifests" in str(result.exception)
