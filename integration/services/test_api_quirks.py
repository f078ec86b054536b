"""Issue 18 D4 and issue 19, on a real node: Services and EndpointSlices holding values the API
server accepts, however odd (a source range padded with a space, legacy leading zeros, a long
port name, duplicated externalIPs, endpoints without conditions, a slice port without a number),
are programmed as kube-proxy programs them (the padded source range is
test_external.py's); and load-balancer ingress IPs that are special
addresses (loopback, unspecified, link-local, multicast) get no rule in any mode, with one warning
naming the object and the field each."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from integration.conftest import Cluster, both_modes
from integration.manifests import NODE_NAME, endpoint_slice_manifest, service_manifest
from integration.netns import NODE_IP, run_kproxy
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
NODE_PORT = 30080
LB_IP = "203.0.113.20"
EXTERNAL_IP = "203.0.113.10"
SPECIAL_INGRESS = ("127.0.0.1", "0.0.0.0", "169.254.169.254", "224.0.0.251")


def _write(cluster: Cluster, name: str, docs: list[dict[str, Any]]) -> None:
    (cluster.manifests / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=True))


def _sync(cluster: Cluster) -> tuple[str, str]:
    """`kproxy sync --once`: its summary line and its stderr (the warnings)."""
    args = ["sync", "--once", "--manifests", str(cluster.manifests)]
    args += ["--hostname-override", NODE_NAME, *cluster.config_args()]
    done = run_kproxy(cluster.node, *args, lock_file=cluster.lock_file)
    return done.stdout.strip(), done.stderr


def _quirky_objects(pods: list[Any]) -> list[dict[str, Any]]:
    """One service and slice holding API-valid quirks at once."""
    svc = service_manifest(
        "quirks", VIP, PORT, TARGET, node_port=NODE_PORT, external_ips=[EXTERNAL_IP]
    )
    spec = svc["spec"]
    spec["clusterIP"] = "010.096.100.010"  # legacy leading zeros: decimal, as Go reads them
    spec["clusterIPs"] = ["010.096.100.010"]
    del spec["ipFamilies"]  # objects from before dual-stack have none
    spec["externalIPs"] = [EXTERNAL_IP, EXTERNAL_IP, f"::ffff:{EXTERNAL_IP}", "not-an-ip"]
    spec["ports"][0].update(name="metrics-exporter-http", targetPort="http-alt")
    spec["ports"][0]["appProtocol"] = "example.com/custom"
    slice_ = endpoint_slice_manifest("quirks", pods, TARGET)
    slice_["ports"][0]["name"] = "metrics-exporter-http"
    slice_["ports"].append({"name": "unused", "port": 0, "protocol": "TCP"})
    for endpoint in slice_["endpoints"]:
        del endpoint["conditions"]  # unset: ready and serving
    octets = slice_["endpoints"][0]["addresses"][0].split(".")
    slice_["endpoints"][0]["addresses"] = [".".join(o.zfill(3) for o in octets)]
    headless = service_manifest("headless", "None", PORT, TARGET)
    headless["spec"].update(clusterIPs=["None"], ports=[])
    external_name = service_manifest("db", "", PORT, TARGET)
    external_name["spec"] = {"type": "ExternalName", "externalName": "db.example.com"}
    return [svc, slice_, headless, external_name]


@both_modes
def test_api_valid_quirks_are_programmed_and_only_the_bad_value_is_left_out(
    cluster: Cluster,
) -> None:
    pods = [cluster.backend(f"q-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    client = cluster.pod("client", "192.168.9.9")
    _write(cluster, "quirks", _quirky_objects(pods))

    _, warnings = _sync(cluster)

    skipped = [line for line in warnings.splitlines() if "object_skipped" in line]
    assert len(skipped) == 1 and "spec.externalIPs[3]" in skipped[0], warnings
    cluster_ip = probe(client.ns, VIP, PORT, "tcp", count=20)
    external = probe(cluster.outside, EXTERNAL_IP, PORT, "tcp", count=20)
    node_port = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=20)
    for result in (cluster_ip, external, node_port):
        assert result.failed == 0, result
        assert set(result.answers) == {"q-1", "q-2"}, result  # p = 2e-6 each to miss one
    assert "no changes" in cluster.sync()


def _special_ingress(cluster: Cluster) -> None:
    svc = service_manifest("etcd", VIP, 2379, 2379, load_balancer_ips=[LB_IP, *SPECIAL_INGRESS])
    pod = cluster.pod("etcd-0", "192.168.1.10")
    _write(cluster, "etcd", [svc, endpoint_slice_manifest("etcd", [pod], 2379)])


def _dump(cluster: Cluster, mode: str) -> tuple[str, str]:
    config = cluster.manifests.parent / f"kube-proxy-{mode}.yaml"
    doc = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}
    config.write_text(yaml.safe_dump({**doc, "mode": mode}))  # the mode's defaults
    args = ["dump", "--manifests", str(cluster.manifests), "--config", str(config)]
    done = run_kproxy(
        cluster.node, *args, "--hostname-override", NODE_NAME, lock_file=cluster.lock_file
    )
    return done.stdout, done.stderr


@pytest.mark.parametrize("mode", ["iptables", "nftables", "userspace"])
def test_special_load_balancer_ips_get_no_rule_in_any_mode(cluster: Cluster, mode: str) -> None:
    _special_ingress(cluster)

    text, warnings = _dump(cluster, mode)

    assert LB_IP in text, text  # the load balancer's real address is programmed
    for ip in SPECIAL_INGRESS:
        assert ip not in text, (ip, text)
    skipped = [line for line in warnings.splitlines() if "object_skipped" in line]
    assert len(skipped) == len(SPECIAL_INGRESS), warnings
    for i, line in enumerate(skipped, start=1):
        assert "Service default/etcd" in line and f"status.loadBalancer.ingress[{i}].ip" in line


@both_modes
def test_special_load_balancer_ips_are_not_in_the_kernel(cluster: Cluster) -> None:
    _special_ingress(cluster)

    cluster.sync()

    rules = cluster.rules(4)
    assert LB_IP in rules, rules
    for ip in SPECIAL_INGRESS:
        assert ip not in rules, (ip, rules)
