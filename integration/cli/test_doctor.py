"""`kproxy doctor` (kproxy/doctor.py) in network namespaces set up to pass and to fail each check.

The doctor runs inside each namespace (`ip netns exec NS python -c ...`) and reports as JSON. Only
sysctls of the test namespaces are written: bridge-nf-call-iptables has been per namespace since
Linux 5.3, and the test checks the root namespace's value is untouched after every write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from integration.netns import Namespace, run, run_kproxy, unique_prefix
from kproxy.doctor import exit_code, render_report, run_checks
from kproxy.doctor.facts import ProxyProcess, classify_process
from kproxy.doctor.judges import (
    Check,
    ConntrackLimits,
    conntrack_limits,
    judge_backend,
    judge_leftovers,
)
from kproxy.errors import ConfigError
from kproxy.model.config import ProxyConfig, parse_config
from kproxy.sync.modes import mode_needs

CHECK_NAMES = [
    "proxy-mode",
    "iptables-backend",
    "service-route",
    "ip-forward",
    "bridge-nf-call-iptables",
    "conntrack-max",
    "kube-proxy-leftovers",
    "kube-proxy-process",
]
# Limits every machine meets, so that check's verdict does not depend on the CI machine's size.
SMALL_CONNTRACK = (1, 1)
BRIDGE_NF_CALL = "/proc/sys/net/bridge/bridge-nf-call-iptables"
NODE_LINK = ("198.51.100.2", "198.51.100.1")  # the node's address and its gateway

DOCTOR = """
import dataclasses, json, sys
from kproxy.doctor import exit_code, render_report, run_checks
from kproxy.doctor.judges import ConntrackLimits
from kproxy.model.config import ProxyConfig
from kproxy.sync.modes import mode_needs
args = json.loads(sys.argv[1])
config = dataclasses.replace(ProxyConfig(), mode=args["mode"])
limits = ConntrackLimits(*args["conntrack"])
checks = run_checks(config, args["service_cidr"], limits, modes=mode_needs())
json.dump({"checks": [dataclasses.asdict(c) for c in checks],
           "report": render_report(checks), "exit": exit_code(checks)}, sys.stdout)
"""

# What upstream kube-proxy (iptables mode) and kubelet leave in the legacy tables of a node: the
# jumps from the built-in chains, the top-level chains and one service with one endpoint. A long
# rule is split with a backslash, which Python removes with the line break.
KUBE_PROXY_RULES = """\
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" \
-j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment \
--comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" \
-j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" \
-j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment \
--comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" \
-j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" \
-j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment \
--comment "block incoming localnet connections" -m conntrack ! \
--ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark \
--mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack \
--ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-STALEENDPOINT0001 - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" \
-j MASQUERADE --random-fully
-A KUBE-SEP-STALEENDPOINT0001 -s 10.244.1.5/32 -m comment --comment "kube-system/kube-dns:dns" \
-j KUBE-MARK-MASQ
-A KUBE-SEP-STALEENDPOINT0001 -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp \
-j DNAT --to-destination 10.244.1.5:53
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment \
--comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -m comment \
--comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" \
-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "kube-system/kube-dns:dns -> 10.244.1.5:53" \
-j KUBE-SEP-STALEENDPOINT0001
COMMIT
"""

# The same service as kproxy finds it in the cluster, with its endpoint moved to another pod.
KUBE_DNS_MANIFESTS = """\
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-1
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
ports: [{name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: [10.244.2.7]
  conditions: {ready: true}
"""


class Namespaces:
    """Network namespaces and processes made by one test; close() removes them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lock_file = workdir / "xtables.lock"
        self.created: list[Namespace] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def new(self) -> Namespace:
        ns = Namespace(unique_prefix("doctor"))
        run(["ip", "netns", "add", ns.name])
        self.created.append(ns)
        ns.ip("link", "set", "lo", "up")
        # A new namespace copies the host's IPv4 settings (net.core.devconf_inherit_init_net 0):
        # start from the kernel's default whatever the host has.
        ns.sysctl({"net.ipv4.ip_forward": "0"})
        return ns

    def spawn(self, ns: Namespace, *argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ns.argv(*argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.processes:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for ns in self.created:
            pids = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns.name], check=False)

    def iptables_restore(self, ns: Namespace, rules: str) -> None:
        ns.run(
            "iptables-legacy-restore", input=rules, env={"XTABLES_LOCKFILE": str(self.lock_file)}
        )

    def kproxy(self, ns: Namespace, *args: str) -> str:
        return run_kproxy(ns, *args, lock_file=self.lock_file).stdout


@pytest.fixture
def namespaces(tmp_path: Path) -> Iterator[Namespaces]:
    made = Namespaces(tmp_path)
    try:
        yield made
    finally:
        made.close()


def doctor(
    ns: Namespace,
    service_cidr: str | None = None,
    conntrack: tuple[int, int] = SMALL_CONNTRACK,
    mode: str = "",
) -> tuple[dict[str, Check], str, int]:
    """Run the doctor inside `ns`: its checks by name, its report and its exit code."""
    args = json.dumps({"service_cidr": service_cidr, "conntrack": conntrack, "mode": mode})
    out = json.loads(ns.run(sys.executable, "-c", DOCTOR, args).stdout)
    checks = [Check(**c) for c in out["checks"]]
    expected = [n for n in CHECK_NAMES if mode != "nftables" or n != "iptables-backend"]
    assert [c.name for c in checks] == expected
    return {c.name: c for c in checks}, out["report"], out["exit"]


def make_node(ns: Namespace, namespaces: Namespaces) -> None:
    """What a working node has: an address, a default route, forwarding, kubelet's hint chain in
    the legacy mangle table."""
    address, gateway = NODE_LINK
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "peer0", "up")
    ns.ip("addr", "add", f"{address}/24", "dev", "eth0")
    ns.ip("route", "add", "default", "via", gateway)
    ns.sysctl({"net.ipv4.ip_forward": "1"})
    namespaces.iptables_restore(ns, "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n")


def add_nft_chain(ns: Namespace, table: str, chain: str | None = None) -> None:
    """An nftables table (and chain) made through netlink, as iptables-nft or kube-proxy's
    nftables mode would leave it; the `nft` tool need not be installed."""
    script = (
        "import sys\nfrom pyroute2.nftables.main import NFTables\n"
        "nft = NFTables(nfgen_family=2)\n"
        "nft.table('add', name=sys.argv[1])\n"
        "if len(sys.argv) > 2: nft.chain('add', table=sys.argv[1], name=sys.argv[2])\n"
        "nft.close()\n"
    )
    ns.run(sys.executable, "-c", script, table, *([chain] if chain else []))


def statuses(checks: dict[str, Check]) -> dict[str, str]:
    return {name: check.status for name, check in checks.items()}


# --- whole reports --------------------------------------------------------------------------


def test_bare_namespace_has_no_route_and_no_forwarding(namespaces: Namespaces) -> None:
    checks, report, code = doctor(namespaces.new())

    assert statuses(checks) == {
        "proxy-mode": "ok",  # legacy x_tables here, as the default iptables mode needs
        "iptables-backend": "warn",  # no kubelet here: nothing to tell the backend by
        "service-route": "fail",
        "ip-forward": "fail",
        "bridge-nf-call-iptables": "ok",
        "conntrack-max": checks["conntrack-max"].status,  # see test_conntrack_limits
        "kube-proxy-leftovers": "ok",
        "kube-proxy-process": "ok",
    }
    assert "10.96.0.1" in checks["service-route"].detail
    assert "net.ipv4.ip_forward is 0" in checks["ip-forward"].detail
    assert code == 1
    assert "FAIL  service-route" in report and "-> sysctl -w net.ipv4.ip_forward=1" in report


def test_prepared_node_passes_every_check(namespaces: Namespaces) -> None:
    ns = namespaces.new()
    make_node(ns, namespaces)

    checks, report, code = doctor(ns)

    assert set(statuses(checks).values()) == {"ok"}, report
    assert "legacy mangle table" in checks["iptables-backend"].detail
    assert f"via {NODE_LINK[1]} dev eth0" in checks["service-route"].detail
    assert code == 0
    assert report.endswith(f"all {len(CHECK_NAMES)} checks passed\n")


# --- one check at a time --------------------------------------------------------------------


def test_service_route_follows_the_given_range(namespaces: Namespaces) -> None:
    ns = namespaces.new()
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "peer0", "up")
    ns.ip("route", "add", "10.96.0.0/12", "dev", "eth0")  # no default route

    assert doctor(ns)[0]["service-route"].status == "ok"
    other = doctor(ns, service_cidr="172.20.0.0/16")[0]["service-route"]
    assert other.status == "fail"
    assert "172.20.0.1" in other.detail and "172.20.0.0/16" in other.advice


def _root_bridge_nf_call() -> str | None:
    try:
        return Path(BRIDGE_NF_CALL).read_text().strip()
    except FileNotFoundError:
        return None


def _set_bridge_nf_call(ns: Namespace, value: str) -> None:
    """Write the namespace's own bridge-nf-call-iptables, and prove the root's did not move."""
    before = _root_bridge_nf_call()
    ns.run("sh", "-c", f"printf {value} > {BRIDGE_NF_CALL}")
    after = _root_bridge_nf_call()
    if after != before:  # a kernel where the setting is global: put it back at once
        Path(BRIDGE_NF_CALL).write_text(str(before))
        pytest.fail("bridge-nf-call-iptables is not per namespace on this kernel")


def test_bridge_needs_bridge_nf_call_iptables(namespaces: Namespaces) -> None:
    ns = namespaces.new()
    ns.ip("link", "add", "cni0", "type", "bridge")
    if ns.run("test", "-e", BRIDGE_NF_CALL, check=False).returncode != 0:
        check = doctor(ns)[0]["bridge-nf-call-iptables"]  # br_netfilter is not loaded here
        assert check.status == "fail" and "br_netfilter is not loaded" in check.detail
        return
    if tuple(int(p) for p in os.uname().release.split(".")[:2]) < (5, 3):
        pytest.skip("bridge-nf-call-iptables is global before Linux 5.3: never written here")

    _set_bridge_nf_call(ns, "0")
    off = doctor(ns)[0]["bridge-nf-call-iptables"]
    _set_bridge_nf_call(ns, "1")
    on = doctor(ns)[0]["bridge-nf-call-iptables"]

    assert off.status == "fail" and "cni0" in off.detail and "modprobe br_netfilter" in off.advice
    assert on.status == "ok" and "cni0" in on.detail


def test_conntrack_limits(namespaces: Namespaces) -> None:
    ns = namespaces.new()
    small = doctor(ns, conntrack=SMALL_CONNTRACK)[0]["conntrack-max"]
    if "not loaded" in small.detail:
        assert small.status == "warn"
        return
    huge = doctor(ns, conntrack=(10**9, 1))[0]["conntrack-max"]
    unmanaged = doctor(ns, conntrack=(0, 10**9))[0]["conntrack-max"]

    assert small.status == "ok"
    assert huge.status == "warn" and "net.netfilter.nf_conntrack_max=" in huge.advice
    assert unmanaged.status == "ok" and "maxPerCore is 0" in unmanaged.detail


def test_kube_proxy_leftovers_fail_until_kproxy_cleanup(namespaces: Namespaces) -> None:
    ns = namespaces.new()
    make_node(ns, namespaces)
    namespaces.iptables_restore(ns, KUBE_PROXY_RULES)

    before, _, code = doctor(ns)
    cleanup = namespaces.kproxy(ns, "cleanup")
    after, _, code_after = doctor(ns)

    leftovers = before["kube-proxy-leftovers"]
    assert leftovers.status == "fail" and code == 1
    assert "KUBE-SERVICES" in leftovers.detail and "no proxy runs" in leftovers.detail
    assert "kproxy cleanup" in leftovers.advice
    assert cleanup.startswith("removed ")
    assert after["kube-proxy-leftovers"].status == "ok" and code_after == 0
    assert after["iptables-backend"].status == "ok"  # kubelet's hint chain stays


def test_chains_of_a_running_kproxy_are_not_leftovers(
    namespaces: Namespaces, tmp_path: Path
) -> None:
    ns = namespaces.new()
    make_node(ns, namespaces)
    namespaces.iptables_restore(ns, KUBE_PROXY_RULES)
    agent = tmp_path / "kproxy"  # stands in for `kproxy run`: the doctor goes by the command line
    agent.write_text("#!/bin/sh\nsleep 300\n")
    agent.chmod(0o755)
    namespaces.spawn(ns, str(agent), "run", "--config=/dev/null")

    checks = _wait_for(ns, lambda c: "running kproxy" in c["kube-proxy-leftovers"].detail)

    assert checks["kube-proxy-leftovers"].status == "ok"
    assert checks["kube-proxy-process"].status == "ok"


def test_ipvs_and_nftables_mode_state_is_reported(namespaces: Namespaces) -> None:
    ns = namespaces.new()
    make_node(ns, namespaces)
    ns.ip("link", "add", "kube-ipvs0", "type", "bridge")  # a dummy link upstream: no dummy here
    add_nft_chain(ns, "kube-proxy")

    leftovers = doctor(ns)[0]["kube-proxy-leftovers"]

    assert leftovers.status == "fail"
    assert "kube-ipvs0" in leftovers.detail and "ip kube-proxy" in leftovers.detail
    assert "kube-proxy --cleanup" in leftovers.advice


def test_backend_follows_kubelets_hint_chain(namespaces: Namespaces) -> None:
    nft_only = namespaces.new()
    add_nft_chain(nft_only, "mangle", "KUBE-IPTABLES-HINT")
    both = namespaces.new()
    add_nft_chain(both, "mangle", "KUBE-KUBELET-CANARY")
    namespaces.iptables_restore(both, "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n")

    on_nft = doctor(nft_only)[0]["iptables-backend"]
    on_both = doctor(both)[0]["iptables-backend"]

    assert on_nft.status == "ok" and "nft mangle" in on_nft.detail
    assert on_both.status == "warn" and "both backends" in on_both.detail


def test_kube_proxy_process_is_found_in_its_namespace_only(
    namespaces: Namespaces, tmp_path: Path
) -> None:
    ns, elsewhere = namespaces.new(), namespaces.new()
    fake = tmp_path / "kube-proxy"
    shutil.copy("/bin/sleep", fake)  # comm is "kube-proxy"
    proc = namespaces.spawn(ns, str(fake), "300")

    checks = _wait_for(ns, lambda c: c["kube-proxy-process"].status == "fail")

    assert str(proc.pid) in checks["kube-proxy-process"].detail
    assert doctor(elsewhere)[0]["kube-proxy-process"].status == "ok"


def _wait_for(ns: Namespace, ready: Any, attempts: int = 20) -> dict[str, Check]:
    """The doctor's checks once `ready(checks)` holds (a spawned process needs a moment to exec)."""
    for _ in range(attempts):
        checks = doctor(ns)[0]
        if ready(checks):
            return checks
    raise AssertionError(f"never ready: {checks}")


# --- kproxy takes kube-proxy's chains over --------------------------------------------------


def test_kproxy_sync_takes_over_kube_proxy_chains_in_place(
    namespaces: Namespaces, tmp_path: Path
) -> None:
    ns = namespaces.new()
    make_node(ns, namespaces)
    namespaces.iptables_restore(ns, KUBE_PROXY_RULES)
    manifests = tmp_path / "kube-dns.yaml"
    manifests.write_text(KUBE_DNS_MANIFESTS)

    namespaces.kproxy(ns, "sync", "--once", "--manifests", str(manifests))
    saved = ns.run("iptables-legacy-save").stdout

    jumps = [line for line in saved.splitlines() if line.startswith("-A ") and _builtin(line)]
    assert len(jumps) == len(set(jumps)), "a jump rule was added twice"
    assert "KUBE-SEP-STALEENDPOINT0001" not in saved  # the old endpoint's chain is gone
    assert "--to-destination 10.244.2.7:53" in saved
    assert ":KUBE-SVC-TCOU7JCQXEZGVUNU" in saved  # same name: same hash as upstream


def _builtin(line: str) -> bool:
    return line.split()[1] in {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


# --- verdicts without a kernel --------------------------------------------------------------


def test_report_lists_every_check_with_advice_for_the_bad_ones() -> None:
    checks = [
        Check("a", "ok", "fine", "never shown"),
        Check("longer-name", "fail", "broken", "fix it"),
        Check("c", "warn", "odd", "look"),
    ]
    report = render_report(checks)

    assert report.splitlines() == [
        "ok    a            fine",
        "FAIL  longer-name  broken",
        "                   -> fix it",
        "WARN  c            odd",
        "                   -> look",
        "",
        "1 failed, 1 warning: fix the failures before running kproxy",
    ]
    assert exit_code(checks) == 1
    assert exit_code([c for c in checks if c.status != "fail"]) == 0


@pytest.mark.parametrize(
    ("comm", "argv", "program"),
    [
        ("kube-proxy", ["/usr/local/bin/kube-proxy", "--config=/x"], "kube-proxy"),
        ("kproxy", ["/opt/venv/bin/python3", "/opt/venv/bin/kproxy", "run"], "kproxy"),
        ("python3", ["python3", "-m", "kproxy.cli", "--log-level", "debug", "run"], "kproxy"),
        ("kproxy", ["/opt/venv/bin/python3", "/opt/venv/bin/kproxy", "doctor"], None),
        ("sleep", ["sleep", "kube-proxy"], None),
    ],
)
def test_processes_are_told_apart(comm: str, argv: list[str], program: str | None) -> None:
    assert classify_process(comm, argv) == program


def test_both_backends_and_running_owner_verdicts() -> None:
    assert judge_backend([], []).status == "warn"
    assert judge_backend(["KUBE-IPTABLES-HINT"], []).status == "ok"
    kproxy = [ProxyProcess(7, "kproxy", "kproxy run")]
    chains = frozenset({"KUBE-SERVICES", "KUBE-SVC-TCOU7JCQXEZGVUNU", "KUBE-FIREWALL"})
    assert judge_leftovers(chains, frozenset(), [], kproxy).status == "ok"
    # kubelet's chains alone are not leftovers
    kubelet = frozenset({"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"})
    assert judge_leftovers(kubelet, frozenset(), [], []).status == "ok"


def test_conntrack_limits_are_read_from_the_config() -> None:
    assert conntrack_limits(ProxyConfig()) == ConntrackLimits(32768, 131072)
    config, _ = parse_config({"conntrack": {"maxPerCore": 0, "min": None}})
    assert conntrack_limits(config) == ConntrackLimits(0, 131072)
    with pytest.raises(ConfigError, match=r"conntrack\.min"):
        parse_config({"conntrack": {"min": "lots"}})


def test_service_cidr_must_be_a_cidr() -> None:
    with pytest.raises(ConfigError, match="--service-cidr"):
        run_checks(ProxyConfig(), "10.96.0.0/33", modes=mode_needs())


def test_nftables_mode_suits_a_node_whose_kubelet_uses_iptables_nft(namespaces: Namespaces) -> None:
    ns = namespaces.new()
    add_nft_chain(ns, "mangle", "KUBE-IPTABLES-HINT")  # kubelet on iptables-nft
    add_nft_chain(ns, "kube-proxy")  # an nftables mode table, and no proxy running

    legacy = doctor(ns)[0]
    nftables = doctor(ns, mode="nftables")[0]

    assert legacy["proxy-mode"].status == "ok" and "iptables-nft" in legacy["proxy-mode"].detail
    assert nftables["proxy-mode"].status == "ok" and "kubelet uses iptables-nft" in (
        nftables["proxy-mode"].detail
    )
    leftovers = nftables["kube-proxy-leftovers"]
    assert leftovers.status == "fail" and "ip kube-proxy" in leftovers.detail
    assert leftovers.advice.startswith("run `kproxy cleanup`")
