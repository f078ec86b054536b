"""`kproxy trace` and `kproxy dump --diff` in the nftables mode, against the `kube-proxy` table
read back over netlink in a node namespace: the trace's verdict agrees with what real traffic
does there, and the diff is empty after a sync and names the edited service after an edit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from integration.cli.test_trace import destinations, trace
from integration.conftest import Cluster
from integration.manifests import NODE_NAME
from integration.netns import NODE_IP, OUTSIDE_IP, run_kproxy
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
NODE_PORT = 30080
CLIENT = "192.168.9.9"


@pytest.fixture
def nft(cluster: Cluster) -> Iterator[Cluster]:
    cluster.mode = "nftables"
    cluster.configure(cluster_cidr="192.168.0.0/16")
    yield cluster


def test_clusterip_and_nodeport_traces_agree_with_traffic(nft: Cluster) -> None:
    backends = [nft.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = nft.pod("client", CLIENT)
    nft.service("web", VIP, PORT, backends, TARGET, node_port=NODE_PORT)
    nft.sync()
    # Another program's table on the same hook: named in the notes, never walked.
    nft.node.run("nft", "add table ip other")
    nft.node.run("nft", "add chain ip other pre { type filter hook prerouting priority 0; }")

    pod = trace(nft, "tcp", f"{VIP}:{PORT}", "--from", CLIENT)
    assert pod["outcome"] == "dnat" and pod["origin"] == "pod" and pod["tables"] == "live"
    assert pod["service"] == "default/web:p"
    assert destinations(pod) == {"192.168.1.10:8080", "192.168.2.10:8080"}
    assert [round(d["share"], 3) for d in pod["destinations"]] == [0.5, 0.5]
    assert pod["masqueraded"] is False
    assert any("ip other pre (hook prerouting, priority 0)" in note for note in pod["notes"])
    assert {h["table"] for b in pod["branches"] for h in b["hops"]} == {"kube-proxy"}
    result = probe(client.ns, VIP, PORT, "tcp", count=40)
    assert set(result.answers) == {"web-1", "web-2"}, result
    assert set(result.sources) == {CLIENT}  # not masqueraded, as the trace said

    outside = trace(nft, "tcp", f"{NODE_IP}:{NODE_PORT}", "--from", OUTSIDE_IP)
    assert outside["outcome"] == "dnat" and outside["origin"] == "outside"
    assert {b["entry"] for b in outside["branches"]} == {"node port"}
    assert outside["masqueraded"] is True
    assert {b["masqueradeReason"] for b in outside["branches"]} == {
        "it came in through a node port, external IP or load-balancer IP (policy Cluster)"
    }
    seen = probe(nft.outside, NODE_IP, NODE_PORT, "tcp", count=20)
    assert seen.failed == 0, seen
    assert set(seen.answers) == {"web-1", "web-2"}, seen
    assert set(seen.sources) == {NODE_IP}  # masqueraded, as the trace said

    # From the node itself: whatever the table does (today the pre-DNAT cluster-ips check in
    # filter-output refuses it), the trace must say what the traffic meets.
    node = trace(nft, "tcp", f"{VIP}:{PORT}")
    from_node = probe(nft.node, VIP, PORT, "tcp", count=40)
    assert node["origin"] == "node"
    if node["outcome"] == "rejected":
        assert from_node.refused == 40, from_node
    else:
        assert node["outcome"] == "dnat", node
        assert set(from_node.answers) == {"web-1", "web-2"}, from_node

    text = nft.kproxy(
        "trace", "tcp", f"{VIP}:{PORT}", "--from", CLIENT, "--config", str(nft.config_file)
    )
    assert "the live tables" in text and "walks kproxy's nftables table only" in text
    assert "default/web:p (cluster IP): DNATed to one of 2 endpoints" in text


def test_service_without_endpoints_is_rejected_as_traced(nft: Cluster) -> None:
    client = nft.pod("client", CLIENT)
    nft.service("empty", VIP, PORT, [], TARGET)
    nft.sync()

    doc = trace(nft, "tcp", f"{VIP}:{PORT}", "--from", CLIENT)
    assert doc["outcome"] == "rejected"
    assert "the service has no endpoints" in doc["branches"][0]["stoppedBy"]
    assert probe(client.ns, VIP, PORT, "tcp", count=2).refused == 2
    other = trace(nft, "tcp", f"{VIP}:81", "--from", CLIENT)
    assert other["outcome"] == "rejected"  # a cluster IP's other ports are rejected too
    assert probe(client.ns, VIP, 81, "tcp", count=1).refused == 1


def test_dump_diff_is_empty_after_a_sync_and_names_the_edited_service(nft: Cluster) -> None:
    backends = [nft.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    nft.service("web", VIP, PORT, backends, TARGET)
    nft.service("other", "10.96.100.11", PORT, backends, TARGET)
    nft.sync()
    args = ["dump", "--diff", "--manifests", str(nft.manifests), "--config", str(nft.config_file)]
    args += ["--hostname-override", NODE_NAME, "--family", "4"]

    same = run_kproxy(nft.node, *args, lock_file=nft.lock_file, check=False)
    assert (same.returncode, same.stdout, same.stderr) == (0, "", "")

    # A rule another program put into kproxy's table: never evaluated, named, and the next
    # sync's repair shows as a rewrite of its chain.
    nft.node.run("nft", "insert rule ip kube-proxy services counter")
    doc = trace(nft, "tcp", f"{VIP}:{PORT}", "--from", CLIENT)
    assert [line.split(" (")[0] for line in doc["unreadable"]] == [
        "chain services: a rule that is not kproxy's"
    ]
    assert doc["outcome"] == "dnat"
    foreign = run_kproxy(nft.node, *args, lock_file=nft.lock_file, check=False)
    assert foreign.returncode == 1, foreign.stderr
    assert "# rewritten: ip kube-proxy chain services" in foreign.stdout
    assert "-\t\t# a rule kproxy cannot read (handle " in foreign.stdout
    nft.sync()

    nft.service("web", VIP, PORT, backends[:1], TARGET)  # web loses an endpoint
    changed = run_kproxy(nft.node, *args, lock_file=nft.lock_file, check=False)
    assert changed.returncode == 1, changed.stderr
    headers = [line for line in changed.stdout.splitlines() if line.startswith("# ")]
    assert headers[0] == "# the next sync would change 2 chains: 1 removed, 1 rewritten"
    assert all("default/web/tcp/" in line for line in headers[1:]), headers
    assert "default/other" not in changed.stdout
    assert "-\t\tnumgen random mod 2 0 goto endpoint-" in changed.stdout

    nft.sync()
    again = run_kproxy(nft.node, *args, lock_file=nft.lock_file, check=False)
    assert (again.returncode, again.stdout) == (0, "")
