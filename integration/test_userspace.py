"""The userspace mode with real traffic: kproxy's relay accepts each connection behind the portal
rules and dials an endpoint itself, so the endpoint sees the node as the source; a refusing
endpoint is retried where the iptables mode's DNAT cannot; switching modes leaves no chain of
the other behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import yaml

from integration.conftest import Cluster
from integration.manifests import NODE_NAME
from integration.netns import NODE_IP, kproxy_path, read_line, stop
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
USERSPACE_CHAINS = ("KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST", "KUBE-NODEPORT-NON-LOCAL")


def _config(cluster: Cluster, mode: str) -> str:
    """bindAddress is the node's address, so container traffic is DNATed to the listener there,
    as upstream did with a specific bindAddress. (With the wildcard, upstream REDIRECTs, which
    needs an address on the interface the packet came in on: a bridge CNI has one, this routed
    topology's pod veths do not.)"""
    path = cluster.manifests.parent / f"kube-proxy-{mode}.yaml"
    doc = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}
    path.write_text(yaml.safe_dump({**doc, "mode": mode, "bindAddress": NODE_IP}))
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
    assert during.failed == 0, during
    assert "KUBE-SERVICES" not in tables and "KUBE-PROXY-CANARY" not in tables, tables
    assert all(chain in tables for chain in USERSPACE_CHAINS), tables

    cluster.config_file = None
    cluster.sync()  # back to iptables
    after = probe(client.ns, VIP, PORT, "tcp", count=5)
    tables = cluster.node.run("iptables-legacy-save").stdout
    assert after.failed == 0, after
    assert not any(chain in tables for chain in USERSPACE_CHAINS), tables
    assert "KUBE-SVC-" in tables
