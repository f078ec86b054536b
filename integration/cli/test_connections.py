"""`kproxy connections` against real conntrack in a network namespace: TCP connections held open
through a ClusterIP are listed under their service and the endpoint each really reached (what
the endpoint's own socket table says), in each kernel mode and in the userspace mode."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from integration.agent_harness import agent_node, slice_object
from integration.conftest import Cluster, both_modes
from integration.manifests import NODE_NAME, service_manifest
from integration.netns import NODE_IP, Namespace, Pod, Topology, read_line, run_kproxy
from integration.traffic import start_server
from integration.userspace.test_userspace import _config as userspace_config
from integration.userspace.test_userspace import userspace_proxy

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
CLIENT, CLIENT6 = "192.168.9.9", "fd00:168:9::9"
VIP6 = "fd00:96::10"
HELD = 16  # connections held open: both endpoints get some (all on one: 2 in 65,536)

# Opens HELD connections to VIP:PORT, prints their local ports, then holds them until killed.
HOLDER = """
import socket, sys, time
held = [socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
        for _ in range(int(sys.argv[3]))]
print(" ".join(str(s.getsockname()[1]) for s in held), flush=True)
time.sleep(3600)
"""


def hold_connections(cluster: Cluster | Topology, client: Pod, vip: str = VIP) -> set[int]:
    """HELD open connections from `client` to the service's `vip`; their client ports."""
    argv = [sys.executable, "-c", HOLDER, vip, str(PORT), str(HELD)]
    topo = cluster if isinstance(cluster, Topology) else cluster.topo
    proc = topo.spawn(client.ns, argv)
    return {int(p) for p in read_line(proc, timeout=30.0).split()}


def peers(ns: Namespace) -> set[str]:
    """`ip:port` of the peers of the established connections to TARGET in `ns`."""
    out = ns.run("ss", "-Htn", "state", "established", f"( sport = :{TARGET} )").stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def relayed_peers(backends: list[Pod]) -> dict[str, set[str]]:
    """Each endpoint's peers, once the relay has dialled an endpoint for every held connection
    (it does so after accepting, so the clients' connects return before); a bound on waiting,
    not on speed."""
    deadline = time.monotonic() + 30.0
    while True:
        truth = {f"{pod.ip}:{TARGET}": peers(pod.ns) for pod in backends}
        if sum(map(len, truth.values())) >= HELD or time.monotonic() > deadline:
            return truth
        time.sleep(0.1)


def connections(cluster: Cluster, *args: str) -> dict[str, Any]:
    out = cluster.kproxy(
        "connections", *args, "--manifests", str(cluster.manifests), "--output", "json"
    )
    doc: dict[str, Any] = json.loads(out)
    return doc


def by_endpoint(doc: dict[str, Any]) -> dict[str, set[str]]:
    """Each group's endpoint -> the clients of its flows (all of default/web, TCP, ClusterIP)."""
    found: dict[str, set[str]] = {}
    for group in doc["groups"]:
        assert (group["service"], group["protocol"]) == ("default/web", "TCP"), group
        for flow in group["flows"]:
            assert flow["destination"] == f"{VIP}:{PORT}" and flow["via"] == "ClusterIP", flow
            assert flow["state"] == "ESTABLISHED" and flow["timeoutSeconds"] > 0, flow
            found.setdefault(group["endpoint"], set()).add(flow["client"])
    return found


def web_service(cluster: Cluster) -> list[Pod]:
    backends = []
    for i in (1, 2):
        pod = cluster.pod(f"web-{i}", f"192.168.{i}.10")
        start_server(cluster.topo, pod.ns, f"web-{i}", TARGET, reply_after_eof=True)
        backends.append(pod)
    cluster.service("web", VIP, PORT, backends, TARGET)
    cluster.service("other", "10.96.100.20", PORT, backends, TARGET)
    return backends


@both_modes
def test_held_connections_are_listed_by_the_endpoint_they_reached(cluster: Cluster) -> None:
    backends = web_service(cluster)
    client = cluster.pod("client", CLIENT)
    cluster.configure(cluster_cidr="192.168.0.0/16")  # pod to ClusterIP: not masqueraded
    cluster.sync()
    ports = hold_connections(cluster, client)
    truth = {f"{pod.ip}:{TARGET}": peers(pod.ns) for pod in backends}
    assert set().union(*truth.values()) == {f"{CLIENT}:{p}" for p in ports}
    assert all(truth.values()), truth  # both endpoints hold some

    doc = connections(cluster, *cluster.config_args())
    assert doc["mode"] == cluster.mode
    assert by_endpoint(doc) == truth
    assert {f["leg"] for g in doc["groups"] for f in g["flows"]} == {"direct"}

    drained = backends[0].ip
    one = connections(cluster, "default/web", "--endpoint", drained, *cluster.config_args())
    assert by_endpoint(one) == {f"{drained}:{TARGET}": truth[f"{drained}:{TARGET}"]}
    assert connections(cluster, "default/other", *cluster.config_args())["groups"] == []


def test_without_config_the_live_mode_is_read_and_said(cluster: Cluster) -> None:
    cluster.mode = "nftables"
    backends = web_service(cluster)
    client = cluster.pod("client", CLIENT)
    cluster.configure(cluster_cidr="192.168.0.0/16")
    cluster.sync()
    ports = hold_connections(cluster, client)
    doc = connections(cluster)  # no --config: the nftables table says the mode
    assert doc["mode"] == "nftables"
    clients = set().union(*by_endpoint(doc).values())
    assert clients == {f"{CLIENT}:{p}" for p in ports}
    assert set(by_endpoint(doc)) == {f"{pod.ip}:{TARGET}" for pod in backends}


def test_userspace_lists_the_relays_legs_by_endpoint(cluster: Cluster) -> None:
    backends = web_service(cluster)
    client = cluster.pod("client", CLIENT)
    with userspace_proxy(cluster):
        ports = hold_connections(cluster, client)
        truth = relayed_peers(backends)
        config = ["--config", userspace_config(cluster, "userspace")]
        everything = connections(cluster, *config)
        doc = connections(cluster, "default/web", *config)
        drained = connections(cluster, "default/web", "--endpoint", backends[1].ip, *config)
    assert doc["mode"] == "userspace"
    # A relay's leg names no service: it is listed under each one the endpoint backs.
    other = [g for g in everything["groups"] if g["service"] == "default/other"]
    assert {f["leg"] for g in other for f in g["flows"]} == {"from-relay"}
    legs: dict[tuple[str, str], set[str]] = {}
    for group in doc["groups"]:
        assert group["service"] == "default/web", group
        for flow in group["flows"]:
            legs.setdefault((group["endpoint"], flow["leg"]), set()).add(flow["client"])
    # The clients' side: to the VIP, answered by the relay on a node address.
    assert legs.pop(("", "to-relay")) == {f"{CLIENT}:{p}" for p in ports}
    # The relay's side: from the node to each endpoint, as the endpoints' sockets show them.
    assert legs == {(ep, "from-relay"): peers for ep, peers in truth.items()}
    assert all(p.startswith(f"{NODE_IP}:") for peers in truth.values() for p in peers)
    assert [g["endpoint"] for g in drained["groups"]] == [f"{backends[1].ip}:{TARGET}"]


def test_the_services_come_from_the_api_server_without_manifests(tmp_path: Path) -> None:
    """As the agent does: the objects through the kubeconfig, the mode from its config."""
    with agent_node("conns", tmp_path) as node:
        backends = []
        for i in (1, 2):
            pod = node.topo.add_pod(f"web-{i}", f"192.168.{i}.10")
            start_server(node.topo, pod.ns, f"web-{i}", TARGET, reply_after_eof=True)
            backends.append(pod)
        node.api.create("Service", service_manifest("web", VIP, PORT, TARGET))
        node.api.create("EndpointSlice", slice_object("web", [b.ip for b in backends], TARGET))
        agent = node.start_agent()
        agent.wait_for_event("sync_completed")
        ports = hold_connections(node.topo, node.client("client", CLIENT))
        truth = {f"{pod.ip}:{TARGET}": peers(pod.ns) for pod in backends}
        args = ["connections", "--kubeconfig", str(node.kubeconfig), "--output", "json"]
        args += ["--hostname-override", NODE_NAME, "--config", str(node.config_file)]
        out = run_kproxy(node.node, *args, lock_file=node.lock_file).stdout
    assert set().union(*truth.values()) == {f"{CLIENT}:{p}" for p in ports}
    assert by_endpoint(json.loads(out)) == {ep: peers for ep, peers in truth.items() if peers}


@both_modes
def test_ipv6_flows_are_listed_with_bracketed_addresses(cluster: Cluster) -> None:
    cluster.topo.enable_ipv6()
    backends = []
    for i in (1, 2):
        pod = cluster.topo.add_pod(f"web-{i}", f"192.168.{i}.10", f"fd00:168:{i}::10")
        start_server(cluster.topo, pod.ns, f"web-{i}", TARGET, family="both", reply_after_eof=True)
        backends.append(pod)
    cluster.service("web", VIP, PORT, backends, TARGET, cluster_ip6=VIP6)
    client = cluster.topo.add_pod("client", CLIENT, CLIENT6)
    cluster.sync()
    ports = hold_connections(cluster, client, VIP6)
    doc = connections(cluster, *cluster.config_args())
    clients: dict[str, set[str]] = {}
    for group in doc["groups"]:
        for flow in group["flows"]:
            assert flow["destination"] == f"[{VIP6}]:{PORT}", flow
            clients.setdefault(group["endpoint"], set()).add(flow["client"])
    truth = {
        f"[fd00:168:{i}::10]:{TARGET}": peers(pod.ns)
        for i, pod in ((1, backends[0]), (2, backends[1]))
    }
    assert clients == {ep: got for ep, got in truth.items() if got}
    assert set().union(*clients.values()) == {f"[{CLIENT6}]:{p}" for p in ports}
