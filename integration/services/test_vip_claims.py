"""Addresses a Service claims on the node beyond its ClusterIP (externalIPs, load-balancer ingress
IPs), and who may claim what: another Service's ClusterIP is never taken over (its own rules
win, whatever the names' order), and `allowedExternalIPCIDRs` (a kproxy extension) leaves every
address outside it without a rule. Real traffic in the iptables and nftables modes; the
userspace mode's portals through `kproxy dump`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.agent_harness import agent_config, agent_node, slice_object, wait_until
from integration.conftest import Cluster, both_modes
from integration.manifests import NODE_NAME, service_manifest
from integration.netns import NODE_IP, run_kproxy
from integration.traffic import probe

VIP = "10.96.100.10"  # the ClusterIP of `web`, which other services claim
PORT = 80
TARGET = 8080
ALLOWED = "203.0.113.0/28"
EXTERNAL_OK = "203.0.113.10"  # inside ALLOWED
EXTERNAL_DENIED = "198.51.100.10"
LB_DENIED = "203.0.113.20"  # outside ALLOWED (203.0.113.0-15)


def _claimers(cluster: Cluster) -> None:
    """`web` (ClusterIP VIP) and two services whose names sort before it, each claiming VIP:80:
    one as an externalIP, one as a load-balancer ingress IP, each with a backend of its own."""
    thieves = [cluster.backend(f"thief-{i}", f"192.168.{i}.20", TARGET) for i in (1, 2)]
    cluster.service("a-claim-ext", "10.96.100.20", PORT, [thieves[0]], TARGET, external_ips=[VIP])
    cluster.service(
        "a-claim-lb", "10.96.100.30", PORT, [thieves[1]], TARGET, load_balancer_ips=[VIP]
    )


def _sync_warnings(cluster: Cluster, *args: str) -> list[str]:
    """`kproxy sync --once` (or ARGS), returning its `object_skipped` warning lines."""
    argv = args or ("sync", "--once", "--manifests", str(cluster.manifests))
    argv = (*argv, "--hostname-override", NODE_NAME, *cluster.config_args())
    proc = run_kproxy(cluster.node, *argv, lock_file=cluster.lock_file)
    return [line for line in proc.stderr.splitlines() if "object_skipped" in line]


def _only(warnings: list[str], service: str) -> str:
    mine = [w for w in warnings if f"Service default/{service}" in w]
    assert len(mine) == 1, warnings
    return mine[0]


@both_modes
def test_another_services_cluster_ip_is_never_taken(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.3.10", TARGET)
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, [web], TARGET)
    _claimers(cluster)

    warnings = _sync_warnings(cluster)
    from_pod = probe(client.ns, VIP, PORT, "tcp", count=12)
    from_outside = probe(cluster.outside, VIP, PORT, "tcp", count=6)

    assert from_pod.answers == {"web-1": 12}, from_pod
    assert from_outside.answers == {"web-1": 6}, from_outside
    ext = _only(warnings, "a-claim-ext")
    assert "spec.externalIPs" in ext and VIP in ext and "default/web" in ext, ext
    lb = _only(warnings, "a-claim-lb")
    assert "status.loadBalancer.ingress" in lb and VIP in lb and "default/web" in lb, lb
    assert "no changes" in cluster.sync()


@both_modes
def test_a_cluster_ip_without_endpoints_stays_refused(cluster: Cluster) -> None:
    """With no endpoint, the ClusterIP's REJECT is in the filter table, after nat: a claimer's
    DNAT there would have taken the connection first."""
    client = cluster.pod("client", "192.168.9.9")
    cluster.service("web", VIP, PORT, [], TARGET)
    _claimers(cluster)
    cluster.sync()

    result = probe(client.ns, VIP, PORT, "tcp", count=4)

    assert result.refused == 4, result


def test_userspace_portals_leave_another_services_cluster_ip_alone(cluster: Cluster) -> None:
    cluster.service("web", VIP, PORT, [], TARGET)
    _claimers(cluster)
    cluster.mode = "userspace"

    text = cluster.kproxy(
        "dump", "--manifests", str(cluster.manifests), "--hostname-override", NODE_NAME,
        *cluster.config_args(),
    )  # fmt: skip

    portals = [line for line in text.splitlines() if f"-d {VIP}/32" in line]
    assert portals and all("default/web" in line for line in portals), portals


def _allow_list(cluster: Cluster, cidrs: list[str], **extra: Any) -> Path:
    cluster.configure()
    assert cluster.config_file is not None
    doc = yaml.safe_load(cluster.config_file.read_text())
    doc.update(allowedExternalIPCIDRs=cidrs, **extra)
    cluster.config_file.write_text(yaml.safe_dump(doc))
    return cluster.config_file


def _allow_list_service(cluster: Cluster) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    cluster.service(
        "web",
        VIP,
        PORT,
        [web],
        TARGET,
        external_ips=[EXTERNAL_OK, EXTERNAL_DENIED],
        load_balancer_ips=[LB_DENIED],
    )


@both_modes
def test_only_allowed_external_addresses_answer(cluster: Cluster) -> None:
    _allow_list_service(cluster)
    _allow_list(cluster, [ALLOWED])

    warnings = _sync_warnings(cluster)
    allowed = probe(cluster.outside, EXTERNAL_OK, PORT, "tcp", count=3)
    denied = [
        probe(cluster.outside, ip, PORT, "tcp", count=2) for ip in (EXTERNAL_DENIED, LB_DENIED)
    ]

    assert allowed.answers == {"web-1": 3}, allowed
    assert allowed.sources == {NODE_IP: 3}, allowed
    for result in denied:
        assert result.answered == 0, result
    assert len(warnings) == 2, warnings
    assert any("spec.externalIPs[1]" in w and EXTERNAL_DENIED in w for w in warnings), warnings
    assert any("status.loadBalancer.ingress[0].ip" in w and LB_DENIED in w for w in warnings), (
        warnings
    )
    assert all("allowedExternalIPCIDRs" in w for w in warnings), warnings
    assert "no changes" in cluster.sync()


def test_userspace_dump_honours_the_allow_list(cluster: Cluster) -> None:
    _allow_list_service(cluster)
    cluster.mode = "userspace"
    _allow_list(cluster, [ALLOWED])

    text = cluster.kproxy(
        "dump", "--manifests", str(cluster.manifests), "--hostname-override", NODE_NAME,
        *cluster.config_args(),
    )  # fmt: skip

    assert re.search(rf"-d {re.escape(EXTERNAL_OK)}/32 .*--dport {PORT}\b", text), text
    assert EXTERNAL_DENIED not in text and LB_DENIED not in text, text


@pytest.mark.parametrize("cidrs", [["not-a-cidr"], "203.0.113.0/28"])
def test_a_bad_allow_list_is_refused_naming_the_field(cluster: Cluster, cidrs: Any) -> None:
    _allow_list_service(cluster)
    _allow_list(cluster, cidrs)
    argv = ["sync", "--once", "--manifests", str(cluster.manifests), *cluster.config_args()]

    proc = run_kproxy(cluster.node, *argv, lock_file=cluster.lock_file, check=False)

    assert proc.returncode != 0, proc
    assert "allowedExternalIPCIDRs" in proc.stderr, proc.stderr


@both_modes
def test_the_long_lived_agent_keeps_both_rules_and_warns_once(
    tmp_path: Path, proxy_mode: str
) -> None:
    """`kproxy run` over manifest files: the allow-list comes from its config; a ClusterIP that
    appears later takes its address back from the claimer (whose rules are rewritten without a
    full sync); each warning is logged once, not at every periodic sync."""
    with agent_node("claims", tmp_path, with_api=False, mode=proxy_mode) as node:
        extra = {"allowedExternalIPCIDRs": [ALLOWED, "10.96.0.0/16"]}
        node.config_file.write_text(yaml.safe_dump(agent_config(mode=proxy_mode, extra=extra)))
        web = node.backend("web-1", "192.168.1.10", TARGET)
        thief = node.backend("thief-1", "192.168.2.20", TARGET)
        client = node.client("client", "192.168.9.9")
        manifests = tmp_path / "manifests"
        manifests.mkdir()

        def write(name: str, cluster_ip: str, pod_ip: str, **options: Any) -> None:
            docs = [
                service_manifest(name, cluster_ip, PORT, TARGET, **options),
                slice_object(name, [pod_ip], TARGET),
            ]
            (manifests / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))

        claims = [EXTERNAL_OK, EXTERNAL_DENIED, VIP]
        write("a-claim-ext", "10.96.100.20", thief.ip, external_ips=claims)
        agent = node.start_agent("--manifests", str(manifests))
        # Nobody holds VIP yet: the claim is the claimer's.
        assert node.probe(client, VIP, PORT, 3) == {"thief-1": 3}

        write("web", VIP, web.ip)
        assert wait_until(lambda: node.probe(client, VIP, PORT, 3) == {"web-1": 3}, 15.0)
        synced = len(agent.events("sync_completed"))
        agent.wait_for_event("sync_completed", count=synced + 3)

        assert node.probe(client, EXTERNAL_OK, PORT, 3) == {"thief-1": 3}
        assert EXTERNAL_DENIED not in node.rules()
        skipped = [(e["object"], e["field"]) for e in agent.events("object_skipped")]
        assert sorted(skipped) == [
            ("Service default/a-claim-ext", "spec.externalIPs"),
            ("Service default/a-claim-ext", "spec.externalIPs[1]"),
        ], agent.events("object_skipped")
