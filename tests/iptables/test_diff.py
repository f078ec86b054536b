"""plan_table_changes / plan_cleanup: what a sync or a cleanup changes, and what it leaves."""

from __future__ import annotations

import pytest
import scenarios

from kproxy.dataplane.xtables.diff import (
    owned_part,
    plan_cleanup,
    plan_table_changes,
)
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.plan.iptables.chains import is_cleanup_chain, is_owned_chain
from kproxy.rules import fragments as f
from kproxy.rules.ir import Chain, JumpRule, Rule, Table
from kproxy.rules.render import render_rule
from kproxy.rules.saved import SavedTable, parse_save

SVC = "KUBE-SVC-AAAAAAAAAAAAAAAA"
SEP = "KUBE-SEP-BBBBBBBBBBBBBBBB"
JUMP = JumpRule("PREROUTING", Rule(matches=(f.comment("portals"),), target=f.jump("KUBE-SERVICES")))


def _desired(*chains: Chain) -> Table:
    return Table("nat", (Chain("KUBE-SERVICES", (Rule(target=f.jump(SVC)),)), *chains), (JUMP,))


def _current(text: str) -> SavedTable:
    return parse_save("*nat\n:PREROUTING ACCEPT [0:0]\n" + text + "COMMIT\n")["nat"]


SVC_CHAIN = Chain(SVC, (Rule(target=f.jump(SEP)),))
SEP_CHAIN = Chain(SEP, (Rule(target=f.dnat("10.0.0.1:80")),))
IN_SYNC = (
    f":KUBE-SERVICES - [0:0]\n:{SVC} - [0:0]\n:{SEP} - [0:0]\n"
    + render_rule("PREROUTING", JUMP.rule)
    + "\n"
    + f"-A KUBE-SERVICES -j {SVC}\n-A {SVC} -j {SEP}\n"
    + f"-A {SEP} -j DNAT --to-destination 10.0.0.1:80\n"
)


def test_against_nothing_everything_is_created_and_written() -> None:
    changes = plan_table_changes(_desired(SVC_CHAIN, SEP_CHAIN), None)
    assert changes.create == ["KUBE-SERVICES", SVC, SEP]
    assert [c.name for c in changes.write] == ["KUBE-SERVICES", SVC, SEP]
    assert changes.insert_jumps == [JUMP]
    assert changes.rules_written == 4
    assert not changes.delete and not changes.remove_jumps


def test_a_table_in_sync_plans_nothing() -> None:
    changes = plan_table_changes(_desired(SVC_CHAIN, SEP_CHAIN), _current(IN_SYNC))
    assert changes.empty
    assert changes.unchanged == 3


def test_a_changed_chain_is_rewritten_not_recreated() -> None:
    moved = Chain(SEP, (Rule(target=f.dnat("10.0.0.2:80")),))
    changes = plan_table_changes(_desired(SVC_CHAIN, moved), _current(IN_SYNC))
    assert changes.create == []
    assert changes.write == [moved]
    assert changes.unchanged == 2


def test_stale_owned_chains_are_deleted_and_foreign_ones_kept() -> None:
    text = IN_SYNC + "".join(
        f":{name} - [0:0]\n"
        for name in (
            "KUBE-SEP-OLDOLDOLDOLDOLD",
            "KUBE-SVC-OLDOLDOLDOLDOLD",
            "KUBE-FIREWALL",
            "KUBE-KUBELET-CANARY",
            "KUBE-MARK-DROP",
            "CNI-HOSTPORT-DNAT",
        )
    )
    changes = plan_table_changes(_desired(SVC_CHAIN, SEP_CHAIN), _current(text))
    assert changes.delete == ["KUBE-SEP-OLDOLDOLDOLDOLD", "KUBE-SVC-OLDOLDOLDOLDOLD"]


def test_a_jump_already_present_below_foreign_rules_is_not_inserted_again() -> None:
    foreign_first = "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n"
    text = IN_SYNC.replace("-A PREROUTING", foreign_first + "-A PREROUTING", 1)
    assert plan_table_changes(_desired(SVC_CHAIN, SEP_CHAIN), _current(text)).empty


def test_only_missing_jumps_are_inserted() -> None:
    other = JumpRule("OUTPUT", JUMP.rule)
    desired = Table("nat", _desired().chains, (JUMP, other))
    changes = plan_table_changes(
        desired, _current(":KUBE-SERVICES - [0:0]\n" + IN_SYNC.split("\n")[3] + "\n")
    )
    assert changes.insert_jumps == [other]


CLEANUP_TEXT = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CNI-FORWARD - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -j CNI-FORWARD
-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES
-A FORWARD -i cni0 -g KUBE-FORWARD
-A OUTPUT -j KUBE-FIREWALL
-A CNI-FORWARD -s 10.244.0.0/16 -j ACCEPT
COMMIT
"""


def test_cleanup_removes_owned_jumps_and_chains_only() -> None:
    current = parse_save(CLEANUP_TEXT)["filter"]
    changes = plan_cleanup(current)
    assert changes.remove_jumps == {"FORWARD": [0, 2, 3]}
    assert changes.delete == ["KUBE-FORWARD", "KUBE-SERVICES"]
    assert not changes.create and not changes.write and not changes.insert_jumps


def test_cleanup_of_a_clean_table_is_empty() -> None:
    assert plan_cleanup(_current("")).empty


def test_cleanup_applied_keeps_kubelet_and_cni_rules() -> None:
    dp = FakeDataplane()
    dp.load(CLEANUP_TEXT)
    dp.cleanup()
    chains = dp.read()["filter"].chains
    assert chains["FORWARD"] == ["-A FORWARD -j CNI-FORWARD"]
    assert chains["INPUT"] == ["-A INPUT -j KUBE-FIREWALL"]
    assert set(chains) == {"INPUT", "FORWARD", "OUTPUT", "CNI-FORWARD", "KUBE-FIREWALL"}


def test_owned_part_leaves_out_foreign_chains_and_rules() -> None:
    part = owned_part(parse_save(CLEANUP_TEXT)["filter"])
    assert {"KUBE-FORWARD", "KUBE-SERVICES"} <= set(part.chains)
    assert "CNI-FORWARD" not in part.chains
    assert len(part.chains["FORWARD"]) == 3
    assert not any("CNI" in line for lines in part.chains.values() for line in lines)


@pytest.mark.parametrize(
    ("name", "owned"),
    [
        ("KUBE-SERVICES", True),
        ("KUBE-POSTROUTING", True),
        ("KUBE-MARK-MASQ", True),
        ("KUBE-PROXY-FIREWALL", True),
        ("KUBE-SVC-TCOU7JCQXEZGVUNU", True),
        ("KUBE-SVL-TCOU7JCQXEZGVUNU", True),
        ("KUBE-EXT-TCOU7JCQXEZGVUNU", True),
        ("KUBE-FW-TCOU7JCQXEZGVUNU", True),
        ("KUBE-SEP-YIL6JZP7A3QYXJU2", True),
        ("KUBE-FIREWALL", False),
        ("KUBE-KUBELET-CANARY", False),
        ("KUBE-IPTABLES-HINT", False),
        ("KUBE-MARK-DROP", False),
        ("CNI-FORWARD", False),
        ("FORWARD", False),
    ],
)
def test_is_owned_chain(name: str, owned: bool) -> None:
    assert is_owned_chain(name) is owned


def test_cleanup_is_not_fooled_by_a_comment_mentioning_a_kube_chain() -> None:
    current = _current('-A PREROUTING -m comment --comment "not -j KUBE-SERVICES here" -j ACCEPT\n')
    assert plan_cleanup(current).remove_jumps == {}


@pytest.mark.parametrize("name", sorted(scenarios.SCENARIOS))
def test_second_plan_after_applying_a_scenario_is_empty(name: str) -> None:
    ruleset = scenarios.SCENARIOS[name]().ruleset()
    dp = FakeDataplane()
    dp.apply(ruleset)
    for table in ruleset.tables:
        assert plan_table_changes(table, dp.read()[table.name]).empty


PORTALS = '-m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort rules"'
NODEPORTS = (
    "-m addrtype --dst-type LOCAL -m comment --comment "
    '"handle service NodePorts; NOTE: this must be the last rule in the chain"'
)
USERSPACE_LEFTOVERS = f"""*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-NODEPORT-CONTAINER - [0:0]
:KUBE-NODEPORT-HOST - [0:0]
:KUBE-PORTALS-CONTAINER - [0:0]
:KUBE-PORTALS-HOST - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING {PORTALS} -j KUBE-PORTALS-CONTAINER
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -j CNI-HOSTPORT-DNAT
-A PREROUTING {NODEPORTS} -j KUBE-NODEPORT-CONTAINER
-A OUTPUT {PORTALS} -j KUBE-PORTALS-HOST
-A OUTPUT {NODEPORTS} -j KUBE-NODEPORT-HOST
-A KUBE-PORTALS-CONTAINER -d 172.30.0.1/32 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 36001
COMMIT
"""


def test_cleanup_removes_the_userspace_modes_leftovers_too() -> None:
    changes = plan_cleanup(parse_save(USERSPACE_LEFTOVERS)["nat"])
    assert changes.remove_jumps == {"PREROUTING": [0, 1, 3], "OUTPUT": [0, 1]}
    assert changes.delete == [
        "KUBE-NODEPORT-CONTAINER",
        "KUBE-NODEPORT-HOST",
        "KUBE-PORTALS-CONTAINER",
        "KUBE-PORTALS-HOST",
        "KUBE-SERVICES",
    ]


def test_cleanup_removes_the_userspace_filter_chain() -> None:
    text = (
        "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-NODEPORT-NON-LOCAL - [0:0]\n"
        '-A INPUT -m comment --comment "Ensure that non-local NodePort traffic can flow"'
        " -j KUBE-NODEPORT-NON-LOCAL\nCOMMIT\n"
    )
    changes = plan_cleanup(parse_save(text)["filter"])
    assert changes.remove_jumps == {"INPUT": [0]}
    assert changes.delete == ["KUBE-NODEPORT-NON-LOCAL"]


@pytest.mark.parametrize("name", ["KUBE-PORTALS-CONTAINER", "KUBE-NODEPORT-NON-LOCAL"])
def test_a_sync_does_not_own_the_userspace_chains(name: str) -> None:
    # The iptables mode's sync must not delete them while built-in chains still jump there.
    assert not is_owned_chain(name)
    assert is_cleanup_chain(name)
