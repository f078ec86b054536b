"""The real-node fixture itself: every simulated node starts with its neighbours' rules, and a
change to any of them is caught when the test ends."""

from __future__ import annotations

import pytest

from integration.netns import Topology, topology
from integration.real_node import FIREWALL_TABLE


def _foreign(topo: Topology) -> list[str]:
    assert topo.foreign is not None
    return topo.foreign.changes()


def test_a_new_node_holds_kubelet_cni_docker_and_firewall_rules() -> None:
    with topology("rn", kubelet="nft") as topo:
        nft_filter = topo.node.run("iptables-nft-save", "-t", "filter").stdout
        assert "-A INPUT -j KUBE-FIREWALL" in nft_filter
        assert "-j cali-FORWARD" in nft_filter
        assert ":KUBE-IPTABLES-HINT" in topo.node.run("iptables-nft-save", "-t", "mangle").stdout
        assert "CNI-HOSTPORT-DNAT" in topo.node.run("iptables-nft-save", "-t", "nat").stdout
        assert "-A FORWARD -j DOCKER-USER" in topo.node.run("iptables-legacy-save").stdout
        assert "hook input" in topo.node.run("nft", "list", "table", "inet", FIREWALL_TABLE).stdout
        # pod veths are routed, with no address on the node's side
        pod = topo.add_pod("p", "192.168.7.7")
        assert "inet " not in topo.node.run("ip", "-4", "addr", "show", pod.node_link).stdout
        assert _foreign(topo) == []


_NO_CNI_OUTPUT_JUMP = (
    "-D",
    "OUTPUT",
    "-m",
    "addrtype",
    "--dst-type",
    "LOCAL",
    "-j",
    "CNI-HOSTPORT-DNAT",
)


@pytest.mark.parametrize(
    ("change", "part"),
    [
        (("iptables-nft", "-D", "OUTPUT", "-j", "KUBE-FIREWALL"), "iptables-nft filter"),
        (("iptables-nft", "-t", "nat", *_NO_CNI_OUTPUT_JUMP), "iptables-nft nat"),
        (
            ("iptables-nft", "-t", "nat", "-A", "CNI-HOSTPORT-DNAT", "-j", "RETURN"),
            "iptables-nft nat",
        ),
        (("iptables-nft", "-t", "mangle", "-X", "KUBE-IPTABLES-HINT"), "iptables-nft mangle"),
        (("ip6tables-nft", "-t", "nat", "-X", "KUBE-KUBELET-CANARY"), "ip6tables-nft nat"),
        (("iptables-legacy", "-t", "nat", "-D", "DOCKER", "1"), "iptables-legacy nat"),
        (("iptables-legacy", "-I", "FORWARD", "-j", "DOCKER-USER"), "iptables-legacy filter"),
        (("nft", "delete", "table", "inet", FIREWALL_TABLE), f"nft {FIREWALL_TABLE}"),
    ],
)
def test_any_change_to_a_neighbours_rules_is_caught(change: tuple[str, ...], part: str) -> None:
    with (
        pytest.raises(AssertionError, match=f"{part} changed"),
        topology("rn", kubelet="nft") as topo,
    ):
        topo.node.run(*change)


def test_a_part_removed_on_purpose_can_be_forgotten() -> None:
    with topology("rn") as topo:
        topo.node.run("iptables-legacy", "-t", "nat", "-F")
        assert topo.foreign is not None
        topo.foreign.forget("iptables-legacy nat")
        with pytest.raises(ValueError, match="not a seeded part"):
            topo.foreign.forget("iptables-legacy raw")


def test_a_clean_node_has_none() -> None:
    with topology("rn", real_node=False) as topo:
        assert topo.foreign is None
        assert "KUBE-FIREWALL" not in topo.node.run("iptables-nft-save").stdout


def test_a_comment_that_looks_like_a_table_header_does_not_fool_the_comparison() -> None:
    with topology("rn") as topo:
        topo.node.run("iptables-legacy", "-t", "nat", "-N", "CNI-X")
        topo.node.run("iptables-legacy", "-t", "nat", "-A", "CNI-X", "-m", "comment",
                      "--comment", "cni\nCOMMIT\n*filter", "-j", "RETURN")  # fmt: skip
        assert _foreign(topo) == []


def test_a_legacy_node_holds_kubelets_and_the_cnis_chains_in_legacy() -> None:
    with topology("rn", kubelet="legacy") as topo:
        mangle = topo.node.run("iptables-legacy-save", "-t", "mangle").stdout
        assert ":KUBE-IPTABLES-HINT" in mangle
        assert "KUBE-IPTABLES-HINT" not in topo.node.run("iptables-nft-save", "-t", "mangle").stdout
        assert ":CNI-HOSTPORT-DNAT" in topo.node.run("iptables-legacy-save", "-t", "nat").stdout
