"""The userspace mode with real traffic: kproxy's relay accepts each connection behind the portal
rules and dials an endpoint itself, so the endpoint sees the node as the source; a refusing
endpoint is retried where the iptables mode's DNAT cannot; ClientIP affinity sticks; a NodePort
answers a client beyond the node; a service without endpoints refuses at once; a half-closed
client gets its whole reply; kube-dns answers over UDP and TCP; switching modes and `kproxy
cleanup` leave no chain of the mode behind (and a foreign rule in place). The long-lived agent
in userspace mode is in test_userspace_agent.py."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from integration.conftest import Cluster
from integration.manifests import NODE_NAME
from integration.netns import NODE_IP, kproxy_path, read_line, stop
from integration.traffic import half_close, probe, start_server

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
NODE_PORT = 30080
USERSPACE_CHAINS = ("KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST", "KUBE-NODEPORT-NON-LOCAL")
# Every chain of the mode, by table, and the comment each jump to one of them carries.
NAT_CHAINS = (
    "KUBE-PORTALS-CONTAINER",
    "KUBE-PORTALS-HOST",
    "KUBE-NODEPORT-CONTAINER",
    "KUBE-NODEPORT-HOST",
)
FILTER_CHAINS = ("KUBE-NODEPORT-NON-LOCAL",)
JUMPS = (
    ("nat", "PREROUTING", "KUBE-PORTALS-CONTAINER"),
    ("nat", "OUTPUT", "KUBE-PORTALS-HOST"),
    ("nat", "PREROUTING", "KUBE-NODEPORT-CONTAINER"),
    ("nat", "OUTPUT", "KUBE-NODEPORT-HOST"),
    ("filter", "INPUT", "KUBE-NODEPORT-NON-LOCAL"),
)
FOREIGN_RULE = "-A PREROUTING -p tcp -m tcp --dport 9 -j ACCEPT"
KUBE_DNS = Path(__file__).parents[1] / "scenarios" / "demo" / "kube-dns.yaml"
DNS_VIP, DNS_POD, DNS_POD_IP = "10.96.0.10", "coredns-1", "192.168.1.2"


def _config(cluster: Cluster, mode: str) -> str:
    """The mode's default config: no bindAddress, so the relay listens on the wildcard and the
    portals send container traffic to a node address (test_userspace_pods.py has routed and
    bridged pods side by side)."""
    path = cluster.manifests.parent / f"kube-proxy-{mode}.yaml"
    doc = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}
    path.write_text(yaml.safe_dump({**doc, "mode": mode}))
    return str(path)


@contextmanager
def userspace_proxy(cluster: Cluster) -> Iterator[subprocess.Popen[str]]:
    """`kproxy sync --once` in userspace mode: it programs the portals, prints its summary, then
    relays in the foreground until it is stopped."""
    argv = [str(kproxy_path()), "--log-level", "warning", "sync", "--once"]
    argv += ["--manifests", str(cluster.manifests), "--hostname-override", NODE_NAME]
    argv += ["--config", _config(cluster, "userspace")]
    proc = cluster.topo.spawn(cluster.node, argv, env={"XTABLES_LOCKFILE": str(cluster.lock_file)})
    try:
        summary = read_line(proc, timeout=60.0)
        assert summary.startswith("synced "), summary
        yield proc
    finally:
        stop(proc)


def test_tcp_is_relayed_round_robin_and_the_endpoint_sees_the_node(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, backends, TARGET)
    with userspace_proxy(cluster):
        result = probe(client.ns, VIP, PORT, "tcp", count=40)
        nat = cluster.node.run("iptables-legacy-save", "-t", "nat").stdout
    assert result.failed == 0, result
    assert result.answers == {"web-1": 20, "web-2": 20}, result.answers  # strict round robin
    assert set(result.sources) == {NODE_IP}, result.sources  # dialled by the node, not NATed
    assert f"-j DNAT --to-destination {NODE_IP}:" in nat and "KUBE-SVC-" not in nat


def test_udp_dns_is_relayed(cluster: Cluster) -> None:
    dns = cluster.backend("dns-1", "192.168.1.53", 53, "udp")
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("kube-dns", VIP, 53, [dns], 53, protocol="UDP")
    with userspace_proxy(cluster):
        result = probe(client.ns, VIP, 53, "udp", count=20)
    assert result.failed == 0 and result.answers == {"dns-1": 20}, result


def test_a_refusing_endpoint_is_retried_where_iptables_mode_fails(cluster: Cluster) -> None:
    up = cluster.backend("web-up", "192.168.1.10", TARGET)
    down = cluster.pod("web-down", "192.168.2.10")  # no server: connections are refused
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, [up, down], TARGET)

    cluster.config_file = None
    cluster.sync()  # the iptables mode: DNAT picks the dead endpoint about half of the time
    dnat = probe(client.ns, VIP, PORT, "tcp", count=60)
    with userspace_proxy(cluster):
        relayed = probe(client.ns, VIP, PORT, "tcp", count=60)

    assert dnat.refused >= 10, dnat  # expected 30 (sd ~4)
    assert relayed.failed == 0 and relayed.answers == {"web-up": 60}, relayed


def test_switching_modes_in_place_leaves_no_chain_of_the_other(cluster: Cluster) -> None:
    backend = cluster.backend("web-1", "192.168.1.10", TARGET)
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, [backend], TARGET)
    cluster.sync()
    with userspace_proxy(cluster):
        during = probe(client.ns, VIP, PORT, "tcp", count=5)
        tables = cluster.node.run("iptables-legacy-save").stdout
        iptables_mode = cluster.save()  # the iptables mode's backend (iptables-nft or legacy)
    assert during.failed == 0, during
    for text in (tables, iptables_mode):
        assert "KUBE-SERVICES" not in text and "KUBE-PROXY-CANARY" not in text, text
    assert all(chain in tables for chain in USERSPACE_CHAINS), tables

    cluster.config_file = None
    cluster.sync()  # back to iptables
    after = probe(client.ns, VIP, PORT, "tcp", count=5)
    tables = cluster.node.run("iptables-legacy-save").stdout
    assert after.failed == 0, after
    assert not any(chain in tables for chain in USERSPACE_CHAINS), tables
    assert "KUBE-SVC-" in cluster.save()


def test_client_ip_affinity_sticks_to_one_endpoint(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, backends, TARGET, affinity=True)
    with userspace_proxy(cluster):
        result = probe(client.ns, VIP, PORT, "tcp", count=20)
    assert result.failed == 0, result
    # Without affinity the relay's round robin splits them 10/10 (the first test).
    assert len(result.answers) == 1 and result.answered == 20, result


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_nodeport_answers_a_client_beyond_the_node(cluster: Cluster, proto: str) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET, proto) for i in (1, 2)]
    cluster.service("web", VIP, PORT, backends, TARGET, protocol=proto.upper(), node_port=NODE_PORT)
    with userspace_proxy(cluster):
        result = probe(cluster.outside, NODE_IP, NODE_PORT, proto, count=20)
    assert result.failed == 0, result
    if proto == "tcp":
        assert result.answers == {"web-1": 10, "web-2": 10}, result  # strict round robin
    else:
        # Every attempt is a new socket, but the kernel may hand a later one the source port of
        # an earlier one whose relay mapping is still live: that datagram keeps its endpoint.
        assert set(result.answers) == {"web-1", "web-2"}, result
        assert min(result.answers.values()) >= 5, result
    assert result.sources == {NODE_IP: 20}, result  # the relay dialled, not the outside client


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_service_without_endpoints_refuses_at_once(cluster: Cluster, proto: str) -> None:
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, [], TARGET, protocol=proto.upper())
    with userspace_proxy(cluster):
        result = probe(client.ns, VIP, PORT, proto, count=10, timeout=2.0)
    # TCP: the relay accepts, finds no endpoint and closes with a reset. UDP: the relay's socket
    # refuses, so the kernel answers ICMP port unreachable. Either way the client is told at
    # once, never left waiting for a timeout.
    assert result.timeout == 0 and result.answered == 0, result
    assert result.refused + result.errors.get("ECONNRESET", 0) == 10, result


def test_a_half_closed_client_gets_the_whole_reply(cluster: Cluster) -> None:
    web = cluster.pod("web-1", "192.168.1.10")
    start_server(cluster.topo, web.ns, "web-1", TARGET, reply_after_eof=True)
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, [web], TARGET)
    size = 300_000  # more than a socket buffer: the reply is still flowing after the EOF
    with userspace_proxy(cluster):
        replies = [half_close(client.ns, VIP, PORT, size) for _ in range(3)]
    for reply in replies:
        # The server only answers once it has read the EOF the relay passed on; the relay keeps
        # the other direction open until the server's EOF.
        assert (reply.name, reply.source, reply.length) == ("web-1", NODE_IP, size), reply
        assert reply.echoed, reply


def test_kube_dns_answers_over_udp_and_tcp(cluster: Cluster) -> None:
    # The demo's kube-dns: one Service with port 53 over UDP and over TCP (and metrics).
    cluster.backend(DNS_POD, DNS_POD_IP, 53, "both")
    client = cluster.pod("client", "192.168.9.9")
    shutil.copy(KUBE_DNS, cluster.manifests / KUBE_DNS.name)
    with userspace_proxy(cluster):
        udp = probe(client.ns, DNS_VIP, 53, "udp", count=10)
        tcp = probe(client.ns, DNS_VIP, 53, "tcp", count=10)
    for result in (udp, tcp):
        assert result.answers == {DNS_POD: 10} and result.failed == 0, result
        assert result.sources == {NODE_IP: 10}, result


def _userspace_leftovers(tables: str) -> list[str]:
    """Lines of `iptables-legacy-save` that belong to the userspace mode: its chains, their
    rules, and the jumps to them."""
    names = (*NAT_CHAINS, *FILTER_CHAINS)
    return [line for line in tables.splitlines() if any(name in line for name in names)]


def test_cleanup_removes_the_mode_and_keeps_a_foreign_rule(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.service("web", VIP, PORT, [web], TARGET, node_port=NODE_PORT)
    with userspace_proxy(cluster):
        lock = {"XTABLES_LOCKFILE": str(cluster.lock_file)}  # beside the portals, in legacy
        cluster.node.run("iptables-legacy", "-w", "-t", "nat", *FOREIGN_RULE.split(), env=lock)
        before = cluster.node.run("iptables-legacy-save").stdout
    # Stopping handed the portals over to iptables-mode rules: cleanup removes either mode's.
    for table, chain in [*(("nat", c) for c in NAT_CHAINS), ("filter", FILTER_CHAINS[0])]:
        assert f":{chain} " in _table(before, table), (table, chain, before)
    for table, builtin, chain in JUMPS:
        assert f"-A {builtin} " in _jumps_to(before, table, chain), (table, chain, before)

    said = cluster.kproxy("cleanup")

    after = cluster.node.run("iptables-legacy-save").stdout
    assert not _userspace_leftovers(after), (said, after)
    assert FOREIGN_RULE in _table(after, "nat").splitlines(), after
    kproxys = [line for line in _table(after, "nat").splitlines() if "KUBE-" in line]
    assert all("KUBE-KUBELET-CANARY" in line for line in kproxys), after  # kubelet's stays


def _table(save: str, table: str) -> str:
    """One table's part of `iptables-legacy-save` output."""
    _, _, rest = save.partition(f"*{table}\n")
    return rest.partition("COMMIT")[0]


def _jumps_to(save: str, table: str, chain: str) -> str:
    return "\n".join(line for line in _table(save, table).splitlines() if f"-j {chain}" in line)


def test_external_policy_local_sends_nodeport_traffic_to_local_endpoints_only(
    cluster: Cluster,
) -> None:
    local = cluster.backend("web-1", "192.168.1.10", TARGET)
    remote = cluster.backend("web-2", "192.168.2.10", TARGET)
    client = cluster.pod("client", "192.168.9.9")
    cluster.service(
        "web",
        VIP,
        PORT,
        [local, remote],
        TARGET,
        node_port=NODE_PORT,
        external_policy="Local",
        remote=[remote.name],
    )
    with userspace_proxy(cluster):
        outside = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=10)
        inside = probe(client.ns, VIP, PORT, "tcp", count=10)
    # The NodePort's portals go to a listener of their own, with the external policy's
    # endpoints; the ClusterIP's keep both (internalTrafficPolicy Cluster).
    assert outside.failed == 0 and outside.answers == {"web-1": 10}, outside
    assert inside.failed == 0 and inside.answers == {"web-1": 5, "web-2": 5}, inside
