"""Issue 9: malformed Services and EndpointSlices beside good ones. Each bad object is skipped with
one warning; every other service is still programmed and reachable, a second sync changes
nothing, and cleanup works, also on a table holding rules whose comments span several lines."""

from __future__ import annotations

import copy
import json
from typing import Any

from integration.conftest import Cluster, both_modes
from integration.manifests import NODE_NAME, endpoint_slice_manifest, service_manifest
from integration.netns import run_kproxy
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080


def _bad(name: str, **spec: Any) -> dict[str, Any]:
    obj = service_manifest(name, "10.96.100.20", PORT, TARGET)
    obj["spec"].update(spec)
    return obj


def _bad_objects() -> list[dict[str, Any]]:
    """One object per class of issue 9 (all of them crashed or corrupted a sync once)."""
    newline = service_manifest("web\nx", "10.96.100.21", PORT, TARGET)
    surrogate = service_manifest("\udc80web", "10.96.100.22", PORT, TARGET)
    nul_namespace = service_manifest("web", "10.96.100.23", PORT, TARGET, namespace="shop\x00")
    metadata = service_manifest("meta", "10.96.100.24", PORT, TARGET)
    metadata["metadata"] = 5
    two_ports = _bad("twoports")
    two_ports["spec"]["ports"] = [dict(two_ports["spec"]["ports"][0]) for _ in range(2)]
    two_ports["spec"]["ports"][1]["port"] = 81
    status = _bad("status")
    status["status"] = []
    return [
        newline,
        surrogate,
        nul_namespace,
        metadata,
        two_ports,
        status,
        _bad("zone", clusterIP="fe80::1%lo", clusterIPs=["fe80::1%lo"]),
        _bad("compatible", clusterIP="::10.0.0.1", clusterIPs=["::10.0.0.1"]),
        _bad("loopback", clusterIP="127.0.0.1", clusterIPs=["127.0.0.1"]),
        _bad("affinity", sessionAffinity="ClientIP", sessionAffinityConfig="x"),
        _bad("ports", ports="eighty"),
        _bad("ranges", type="LoadBalancer", loadBalancerSourceRanges=10),
        _bad("policy", type="NodePort", externalTrafficPolicy="Sometimes"),
    ]


def _write_bad(cluster: Cluster, pods: list[Any]) -> None:
    slice_ = endpoint_slice_manifest("web", pods, TARGET)
    slice_["metadata"]["name"] = "web-bad"
    good_ep = slice_["endpoints"][0]
    bad_address = {**copy.deepcopy(good_ep), "addresses": ["10.0.0.999"]}
    bad_ready = {**copy.deepcopy(good_ep), "addresses": ["192.168.2.10"], "conditions": "true"}
    slice_["endpoints"] = [bad_address, bad_ready, good_ep]
    hints = endpoint_slice_manifest("web", pods[:1], TARGET)
    hints["metadata"]["name"] = "web-hints"
    hints["endpoints"][0]["hints"] = {"forZones": "zone-a"}
    docs = [*_bad_objects(), slice_, hints]
    # JSON (one document per file) carries lone surrogates and NULs through unchanged.
    for i, doc in enumerate(docs):
        (cluster.manifests / f"bad-{i}.json").write_text(json.dumps(doc))


@both_modes
def test_bad_objects_are_skipped_and_the_rest_is_programmed(cluster: Cluster) -> None:
    good = cluster.backend("web-1", "192.168.1.10", TARGET)
    other = cluster.backend("web-2", "192.168.2.10", TARGET)
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, [good], TARGET)
    _write_bad(cluster, [good, other])
    args = [
        "sync",
        "--once",
        "--manifests",
        str(cluster.manifests),
        "--hostname-override",
        NODE_NAME,
        *cluster.config_args(),
    ]

    first = run_kproxy(cluster.node, *args, lock_file=cluster.lock_file)

    assert "Traceback" not in first.stderr
    skipped = [line for line in first.stderr.splitlines() if "object_skipped" in line]
    # 13 bad Services, 2 bad endpoints and the hints of a third.
    assert len(skipped) == 16, "\n".join(skipped)
    result = probe(client.ns, VIP, PORT, "tcp", count=20)
    assert result.failed == 0, result
    assert set(result.answers) == {"web-1"}  # the other endpoint's conditions were bad
    for family in (4, 6):
        saved = cluster.rules(family)
        assert all(line.expandtabs().isprintable() for line in saved.splitlines()), saved
    second = run_kproxy(cluster.node, *args, lock_file=cluster.lock_file)
    assert "no changes" in second.stdout, second.stdout
    cleanup = cluster.kproxy("cleanup")
    assert "removed" in cleanup
    assert "KUBE-SERVICES" not in cluster.save(4) and "KUBE-SVC-" not in cluster.save(4)
    assert "kube-proxy" not in cluster.node.run("nft", "list", "tables").stdout


# The iptables mode only: what it checks is how iptables-legacy-save text with multi-line
# comments is parsed, and the nftables mode reads no iptables text.
def test_a_table_with_multiline_comments_syncs_and_cleans_up(cluster: Cluster) -> None:
    good = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.service("web", VIP, PORT, [good], TARGET)
    # What an older kproxy left for a Service named "web\nx", and a foreign rule alike.
    cluster.iptables("-t", "nat", "-N", "KUBE-SVC-OLDOLDOLDOLDOLD")
    cluster.iptables("-t", "nat", "-A", "KUBE-SVC-OLDOLDOLDOLDOLD", "-m", "comment",
                     "--comment", "default/web\nx:p\rcluster IP", "-j", "RETURN")  # fmt: skip
    cluster.iptables("-t", "nat", "-N", "CNI-X")
    cluster.iptables("-t", "nat", "-A", "CNI-X", "-m", "comment",
                     "--comment", "cni\nCOMMIT\n*filter", "-j", "RETURN")  # fmt: skip
    cni_rule = [line for line in cluster.save(4).split("\n") if "cni" in line]

    cluster.sync()
    assert "no changes" in cluster.sync()

    saved = cluster.save(4)
    assert "KUBE-SVC-OLDOLDOLDOLDOLD" not in saved
    assert [line for line in saved.split("\n") if "cni" in line] == cni_rule
    cluster.kproxy("cleanup")
    saved = cluster.save(4)
    assert "KUBE-SERVICES" not in saved and "KUBE-SVC-" not in saved
    assert [line for line in saved.split("\n") if "cni" in line] == cni_rule
