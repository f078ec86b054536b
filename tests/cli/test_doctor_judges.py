"""`kproxy doctor`'s verdicts on which proxy mode suits a node, and on leftovers per mode."""

from __future__ import annotations

from kproxy.dataplane.base import NodeNeeds
from kproxy.doctor.facts import ProxyProcess
from kproxy.doctor.judges import judge_backend, judge_leftovers, judge_proxy_mode
from kproxy.sync.modes import mode_needs

MODES = mode_needs()

HINT = {"KUBE-IPTABLES-HINT"}
KPROXY = [ProxyProcess(7, "kproxy", "kproxy run")]
LEGACY_CHAINS = frozenset({"KUBE-SERVICES", "KUBE-SVC-ABCDEFGHIJKLMNOP"})
NFT_TABLE = frozenset({("ip", "kube-proxy", ""), ("ip", "kube-proxy", "services")})


def test_iptables_on_a_legacy_node_suits_and_mentions_nftables_where_the_kernel_allows() -> None:
    check = judge_proxy_mode("", MODES, "6.18.44", True, HINT, set())
    assert check.status == "ok" and "mode iptables suits" in check.detail
    assert "nftables would suit it too" in check.detail
    old = judge_proxy_mode("iptables", MODES, "5.10.0-28-amd64", True, HINT, set())
    assert old.status == "ok" and "nftables" not in old.detail


def test_kubelet_on_iptables_nft_suits_the_iptables_mode_not_the_userspace_one() -> None:
    check = judge_proxy_mode("iptables", MODES, "6.1.0", True, set(), HINT)
    assert check.status == "ok" and "writes iptables-nft here" in check.detail
    userspace = judge_proxy_mode("userspace", MODES, "6.1.0", True, set(), HINT)
    assert userspace.status == "warn" and "iptables-nft" in userspace.detail
    assert userspace.advice == "use `mode: nftables`"
    assert judge_proxy_mode("nftables", MODES, "6.1.0", True, set(), HINT).status == "ok"
    assert judge_proxy_mode("iptables", MODES, "6.6.0", False, set(), HINT).status == "ok"


def test_backend_passes_where_kubelet_writes_and_fails_an_override_elsewhere() -> None:
    assert judge_backend([], HINT).status == "ok"
    assert "nft mangle" in judge_backend([], HINT).detail
    assert judge_backend(HINT, []).status == "ok"
    assert judge_backend([], HINT, "nft").status == "ok"
    forced = judge_backend([], HINT, "legacy")
    assert forced.status == "fail" and "iptablesBackend: auto" in forced.advice
    assert judge_backend(HINT, HINT).status == "warn"
    assert judge_backend([], []).status == "warn"


def test_the_nft_backends_chains_are_the_running_iptables_modes_own() -> None:
    nft_chains = frozenset({("ip", "nat", "KUBE-SERVICES"), ("ip", "nat", "KUBE-SVC-ABC")})
    running = judge_leftovers(frozenset(), nft_chains, [], KPROXY, "iptables", "iptables-nft")
    assert running.status == "ok" and "iptables-nft tables" in running.detail
    stopped = judge_leftovers(frozenset(), nft_chains, [], [], "iptables", "iptables-nft")
    assert stopped.status == "fail" and stopped.advice.startswith("run `kproxy cleanup`")


def test_an_nft_only_kernel_fails_the_legacy_modes() -> None:
    for mode in ("iptables", "userspace"):
        check = judge_proxy_mode(mode, MODES, "6.6.0", False, set(), set())
        assert check.status == "fail" and "no legacy x_tables" in check.detail
        assert check.advice == "use `mode: nftables`"


def test_nftables_mode_needs_kernel_5_13() -> None:
    check = judge_proxy_mode("nftables", MODES, "5.10.0-28-amd64", True, HINT, set())
    assert check.status == "fail" and ">= 5.13" in check.detail
    assert "mode: iptables" in check.advice
    assert judge_proxy_mode("nftables", MODES, "5.13.0", True, HINT, set()).status == "ok"


def test_the_running_modes_own_rules_are_not_leftovers_the_other_modes_are() -> None:
    nft_running = judge_leftovers(frozenset(), NFT_TABLE, [], KPROXY, "nftables", "nftables")
    assert nft_running.status == "ok" and "ip kube-proxy" in nft_running.detail
    both = judge_leftovers(LEGACY_CHAINS, NFT_TABLE, [], KPROXY, "nftables", "nftables")
    assert both.status == "fail" and "legacy tables" in both.detail
    assert "ip kube-proxy" not in both.detail and "restart it" in both.advice
    legacy_running = judge_leftovers(LEGACY_CHAINS, NFT_TABLE, [], KPROXY, "iptables")
    assert legacy_running.status == "fail" and "ip kube-proxy" in legacy_running.detail


def test_without_a_proxy_kproxy_cleanup_removes_both_kinds() -> None:
    check = judge_leftovers(LEGACY_CHAINS, NFT_TABLE, [], [], "nftables", "nftables")
    assert check.status == "fail" and "no proxy runs" in check.detail
    assert "ip kube-proxy" in check.detail and "KUBE-SERVICES" in check.detail
    assert check.advice.startswith("run `kproxy cleanup`")


def test_the_verdict_follows_what_each_mode_needs_not_its_name() -> None:
    modes = {"iptables": NodeNeeds("legacy"), "ebpf": NodeNeeds("nftables", (6, 6))}
    old = judge_proxy_mode("ebpf", modes, "6.1.0", True, HINT, set())
    assert old.status == "fail" and "mode ebpf needs kernel >= 6.6" in old.detail
    assert old.advice == "use `mode: iptables` on this node"
    check = judge_proxy_mode("iptables", modes, "6.6.1", False, set(), set())
    assert check.status == "fail" and check.advice == "use `mode: ebpf`"


def test_the_doctor_reads_each_backends_chains_once_per_run(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import kproxy.doctor as doctor
    from kproxy.dataplane.xtables import detect
    from kproxy.model.config import ProxyConfig

    reads = {"legacy": 0, "nft": 0, "facts": 0}

    def legacy() -> frozenset[str]:
        reads["legacy"] += 1
        return frozenset({"KUBE-IPTABLES-HINT"})

    def nft() -> frozenset[tuple[str, str, str]]:
        reads["nft"] += 1
        return frozenset()

    def facts() -> None:
        reads["facts"] += 1
        raise AssertionError("a kubelet hint decides the backend: no rule count is needed")

    monkeypatch.setattr(doctor, "read_all_legacy_chains", legacy)
    monkeypatch.setattr(doctor, "read_nft_chains", nft)
    monkeypatch.setattr(detect, "read_backend_facts", facts)
    monkeypatch.setattr(doctor, "read_backend_facts", facts, raising=False)
    checks = doctor.run_checks(ProxyConfig(mode="iptables"), modes=MODES)
    by_name = {c.name: c for c in checks}
    assert by_name["iptables-backend"].status == "ok"
    assert "could not check" not in by_name["kube-proxy-leftovers"].detail
    assert reads == {"legacy": 1, "nft": 1, "facts": 0}
