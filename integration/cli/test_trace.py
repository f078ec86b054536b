"""`kproxy trace`, `kproxy dump --diff` and `kproxy status` against real tables in a network
namespace: the trace's verdict agrees with what real traffic does there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from integration.agent_harness import METRICS_PORT, agent_node, slice_object
from integration.conftest import Cluster
from integration.demo import INGRESS_SCENARIO as INGRESS_SEED
from integration.demo import SCENARIO as SEED
from integration.demo import read_backends, start_backends
from integration.iptables_backend import mode_backend
from integration.manifests import NODE_NAME, service_manifest
from integration.netns import NODE_IP, OUTSIDE_IP, run_kproxy
from integration.traffic import probe
from integration.userspace.test_userspace import _config as userspace_config
from integration.userspace.test_userspace import userspace_proxy

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
CLIENT = "192.168.9.9"


def trace(cluster: Cluster, *args: str) -> dict[str, Any]:
    """`kproxy trace ... --output json` on the node's live tables."""
    config = ["--config", str(cluster.config_file)] if cluster.config_file else []
    out = cluster.kproxy("trace", *args, *config, "--output", "json")
    doc: dict[str, Any] = json.loads(out)
    return doc


def destinations(doc: dict[str, Any]) -> set[str]:
    return {d["destination"] for d in doc["destinations"]}


def test_dnat_shares_agree_with_traffic_and_masquerade(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", CLIENT)
    cluster.configure(cluster_cidr="192.168.0.0/16")
    cluster.service("web", VIP, PORT, backends, TARGET, node_port=30080)
    cluster.sync()

    pod = trace(cluster, "tcp", f"{VIP}:{PORT}", "--from", CLIENT)
    assert pod["outcome"] == "dnat" and pod["origin"] == "pod"
    assert pod["service"].startswith("default/web")
    assert destinations(pod) == {"192.168.1.10:8080", "192.168.2.10:8080"}
    assert [round(d["share"], 3) for d in pod["destinations"]] == [0.5, 0.5]
    assert pod["masqueraded"] is False
    result = probe(client.ns, VIP, PORT, "tcp", count=40)
    assert set(result.answers) == {"web-1", "web-2"}
    assert set(result.sources) == {CLIENT}  # not masqueraded, as the trace said

    outside = trace(cluster, "tcp", f"{NODE_IP}:30080", "--from", OUTSIDE_IP)
    assert outside["outcome"] == "dnat" and outside["origin"] == "outside"
    assert outside["masqueraded"] is True
    reasons = {b["masqueradeReason"] for b in outside["branches"]}
    assert reasons == {
        "it came in through a node port, external IP or load-balancer IP (policy Cluster)"
    }
    seen = probe(cluster.outside, NODE_IP, 30080, "tcp", count=10)
    assert seen.failed == 0, seen
    assert OUTSIDE_IP not in seen.sources  # masqueraded, as the trace said

    node = trace(cluster, "tcp", f"{VIP}:{PORT}")
    assert node["origin"] == "node" and node["hook"] == "OUTPUT"
    assert destinations(node) == destinations(pod)


def test_reject_without_endpoints_agrees_with_traffic(cluster: Cluster) -> None:
    client = cluster.pod("client", CLIENT)
    cluster.service("empty", VIP, PORT, [], TARGET)
    cluster.sync()

    doc = trace(cluster, "tcp", f"{VIP}:{PORT}", "--from", CLIENT)
    assert doc["outcome"] == "rejected"
    assert "has no endpoints" in doc["branches"][0]["stoppedBy"]
    assert probe(client.ns, VIP, PORT, "tcp", count=2).refused == 2


def test_drop_for_local_policy_without_local_endpoint(cluster: Cluster) -> None:
    remote = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.service(
        "local",
        VIP,
        PORT,
        [remote],
        TARGET,
        node_port=30081,
        external_policy="Local",
        remote={"web-1"},
    )
    cluster.sync()

    doc = trace(cluster, "tcp", f"{NODE_IP}:30081", "--from", OUTSIDE_IP)
    assert doc["outcome"] == "dropped"
    assert "has no local endpoints" in doc["branches"][0]["stoppedBy"]
    result = probe(cluster.outside, NODE_IP, 30081, "tcp", count=1, timeout=0.5)
    assert result.timeout == 1, result  # dropped: no answer, no refusal


def test_affinity_agrees_with_traffic(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", CLIENT)
    cluster.service("sticky", VIP, PORT, backends, TARGET, affinity=True)
    cluster.sync()

    doc = trace(cluster, "tcp", f"{VIP}:{PORT}", "--from", CLIENT)
    assert doc["affinitySeconds"] == 10800
    assert len(doc["destinations"]) == 2
    assert len(probe(client.ns, VIP, PORT, "tcp", count=20).answers) == 1


def test_untouched_and_accepted_name_the_other_programs_rules(cluster: Cluster) -> None:
    backend = cluster.backend("web-1", "192.168.1.10", TARGET)
    client = cluster.pod("client", CLIENT)
    cluster.service("web", VIP, PORT, [backend], TARGET)
    cluster.sync()
    cluster.iptables(
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-s",
        CLIENT,
        "-p",
        "tcp",
        "--dport",
        "9",
        "-m",
        "comment",
        "--comment",
        "a CNI hostport",
        "-j",
        "ACCEPT",
    )
    cluster.iptables("-A", "FORWARD", "-p", "udp", "--dport", "9", "-j", "DROP")

    doc = trace(cluster, "tcp", f"192.168.1.10:{TARGET}", "--from", CLIENT)
    assert doc["outcome"] == "not-a-service"
    assert destinations(doc) == set()
    text = cluster.kproxy("trace", "tcp", "192.168.1.10:9", "--from", CLIENT)
    assert "not a Service" in text
    assert (
        "-A PREROUTING -s 192.168.9.9/32 -p tcp -m tcp --dport 9 -m comment "
        '--comment "a CNI hostport" -j ACCEPT' in text
    )

    dropped = trace(cluster, "udp", "192.168.1.10:9", "--from", CLIENT)
    assert dropped["outcome"] == "dropped"
    assert dropped["branches"][0]["stoppedBy"].startswith("another program's rule: -A FORWARD")
    assert probe(client.ns, "192.168.1.10", TARGET, "tcp", count=1).answers == {"web-1": 1}


def test_ipv6_trace_agrees_with_traffic(cluster: Cluster) -> None:
    cluster.topo.enable_ipv6()
    backends = [
        cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET, ip6=f"fd00:10::{i}") for i in (1, 2)
    ]
    cluster.service("web", VIP, PORT, backends, TARGET, cluster_ip6="fd00:96::10")
    cluster.sync()

    doc = trace(cluster, "tcp", f"[fd00:96::10]:{PORT}", "--from", "fd00:31::1")
    assert doc["family"] == 6 and doc["outcome"] == "dnat"
    assert destinations(doc) == {"[fd00:10::1]:8080", "[fd00:10::2]:8080"}
    result = probe(cluster.outside, "fd00:96::10", PORT, "tcp", count=20)
    assert set(result.answers) == {"web-1", "web-2"}


def test_dump_diff_is_empty_after_a_sync_and_shows_the_edited_service(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    cluster.service("web", VIP, PORT, backends, TARGET)
    cluster.service("other", "10.96.100.11", PORT, backends, TARGET)
    cluster.sync()
    args = ["dump", "--diff", "--manifests", str(cluster.manifests)]
    args += ["--hostname-override", NODE_NAME, "--family", "4"]

    same = run_kproxy(cluster.node, *args, lock_file=cluster.lock_file, check=False)
    assert (same.returncode, same.stdout) == (0, "")

    cluster.service("web", VIP, PORT, backends[:1], TARGET)  # web loses an endpoint
    changed = run_kproxy(cluster.node, *args, lock_file=cluster.lock_file, check=False)
    assert changed.returncode == 1, changed.stderr
    headers = [line for line in changed.stdout.splitlines() if line.startswith("# ")]
    assert headers[0] == "# the next sync would change 2 chains: 1 removed, 1 rewritten"
    diff_lines = [line for line in changed.stdout.splitlines() if line[:1] in "+-"]
    assert diff_lines and all(
        "default/web" in line or line.startswith(("---", "+++")) for line in diff_lines
    )
    assert "default/other" not in changed.stdout


def test_status_against_a_running_agent(tmp_path: Path) -> None:
    with agent_node("status", tmp_path, with_api=False) as node:
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        good = service_manifest("web", VIP, PORT, TARGET)
        bad = service_manifest("broken", "10.96.100.12", PORT, TARGET)
        bad["spec"]["ports"][0]["protocol"] = "ICMP"
        (manifests / "svc.yaml").write_text(yaml.safe_dump_all([good, bad]))
        node.start_agent("--manifests", str(manifests))

        out = run_kproxy(
            node.node,
            "status",
            "--address",
            f"127.0.0.1:{METRICS_PORT}",
            "--output",
            "json",
            lock_file=node.lock_file,
        ).stdout
        body = json.loads(out)
        assert body["mode"] == "iptables"
        assert body["iptablesBackend"] == mode_backend(node.topo)
        assert body["lastSync"]["full"] is True
        assert body["syncs"]["count"] >= 1
        assert body["programmed"]["services"] == 1
        assert [s["object"] for s in body["skipped"]] == ["Service default/broken"]
        assert body["sources"] and body["sources"][0]["problem"] is None

        text = run_kproxy(
            node.node, "status", "--config", str(node.config_file), lock_file=node.lock_file
        ).stdout
        assert "Service default/broken: spec.ports[0].protocol:" in text
        assert "last sync:" in text and "none yet" not in text
        assert f", {mode_backend(node.topo)} backend" in text


def test_userspace_trace_ends_at_the_relay_and_dump_diff_knows_its_ports(
    cluster: Cluster,
) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", CLIENT)
    cluster.service("web", VIP, PORT, backends, TARGET)
    with userspace_proxy(cluster):
        config = userspace_config(cluster, "userspace")
        out = cluster.kproxy("trace", "tcp", f"{VIP}:{PORT}", "--from", CLIENT, "--config", config)
        doc = json.loads(
            cluster.kproxy(
                "trace",
                "tcp",
                f"{VIP}:{PORT}",
                "--from",
                CLIENT,
                "--config",
                config,
                "--output",
                "json",
            )
        )
        args = ["dump", "--diff", "--manifests", str(cluster.manifests), "--config", config]
        diff = run_kproxy(
            cluster.node,
            *args,
            "--hostname-override",
            NODE_NAME,
            "--family",
            "4",
            lock_file=cluster.lock_file,
            check=False,
        )
        result = probe(client.ns, VIP, PORT, "tcp", count=10)

    assert doc["outcome"] == "relayed"
    port = int(doc["branches"][0]["destination"].rsplit(":", 1)[1])
    assert port > 0
    assert f"relayed by kproxy's userspace listener on port {port}" in out
    assert f"-j DNAT --to-destination {NODE_IP}:{port}" in out
    assert (diff.returncode, diff.stdout) == (0, ""), diff.stdout
    assert set(result.answers) == {"web-1", "web-2"}
    assert set(result.sources) == {NODE_IP}  # the relay connects from the node, as said


def test_dump_diff_from_the_api_server(tmp_path: Path) -> None:
    """Without --manifests, `dump --diff` lists the objects through the kubeconfig, as the
    agent would; an edit made while the agent is stopped is exactly what it shows."""
    with agent_node("apidiff", tmp_path) as node:
        a = node.backend("web-1", "192.168.1.10", TARGET)
        b = node.backend("web-2", "192.168.2.10", TARGET)
        node.api.create("Service", service_manifest("web", VIP, PORT, TARGET))
        node.api.create("Service", service_manifest("other", "10.96.100.11", PORT, TARGET))
        node.api.create("EndpointSlice", slice_object("web", [a.ip, b.ip], TARGET))
        node.api.create("EndpointSlice", slice_object("other", [a.ip], TARGET))
        agent = node.start_agent()
        agent.wait_for_event("sync_completed", count=2)
        agent.terminate()  # the rules stay; nothing syncs the edit below
        args = ["dump", "--diff", "--kubeconfig", str(node.kubeconfig)]
        args += ["--hostname-override", NODE_NAME, "--family", "4"]

        same = run_kproxy(node.node, *args, lock_file=node.lock_file, check=False)
        assert (same.returncode, same.stdout) == (0, ""), same.stdout + same.stderr

        node.api.update("EndpointSlice", slice_object("web", [a.ip], TARGET))
        changed = run_kproxy(node.node, *args, lock_file=node.lock_file, check=False)
        assert changed.returncode == 1, changed.stderr
        assert "default/web" in changed.stdout and "default/other" not in changed.stdout
        assert "--to-destination 192.168.2.10:8080" in changed.stdout


def test_seed_scenario_traces_agree_with_traffic(cluster: Cluster) -> None:
    """The demo and ingress scenarios, served for real: my-nginx from a pod, kube-dns over UDP,
    the ingress NodePort from outside; each trace names what the traffic then meets."""
    for path in (*sorted(SEED.glob("*.yaml")), *sorted(INGRESS_SEED.glob("*.yaml"))):
        shutil.copy(path, cluster.manifests / f"{path.parent.name}-{path.name}")
    start_backends(cluster.topo, read_backends(SEED) + read_backends(INGRESS_SEED))
    client = cluster.pod("client", CLIENT)
    cluster.sync()

    nginx = trace(cluster, "tcp", "10.104.164.89:80", "--from", CLIENT)
    assert nginx["service"] == "default/my-nginx"
    assert destinations(nginx) == {"192.168.183.140:80", "192.168.224.7:80"}
    web = probe(client.ns, "10.104.164.89", 80, "tcp", count=20, http=True)
    assert set(web.answers) == {"my-nginx-1", "my-nginx-2"}, web
    assert web.sources == {CLIENT: 20}  # not masqueraded, as the trace said

    dns = trace(cluster, "udp", "10.96.0.10:53", "--from", CLIENT)
    assert (dns["service"], destinations(dns)) == ("kube-system/kube-dns:dns", {"192.168.1.2:53"})
    assert probe(client.ns, "10.96.0.10", 53, "udp", count=5).answers == {"coredns-1": 5}

    ingress = trace(cluster, "tcp", f"{NODE_IP}:30189", "--from", OUTSIDE_IP)
    assert ingress["service"] == "ingress-nginx/ingress-nginx-controller:http"
    assert destinations(ingress) == {"192.168.235.20:80"}
    assert ingress["masqueraded"] is True
    outside = probe(cluster.outside, NODE_IP, 30189, "tcp", count=5, http=True)
    assert outside.failed == 0, outside
    assert OUTSIDE_IP not in outside.sources
