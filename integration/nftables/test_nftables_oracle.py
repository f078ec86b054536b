"""The netlink writer against an oracle: for random small clusters, what kproxy writes over
netlink (listed with `nft -j list table`) equals what `nft -f` makes of kproxy's rendered text,
loaded into a second fresh namespace."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integration.netns import Namespace, nft_listing
from kproxy.model.config import ProxyConfig
from kproxy.model.endpoint import Endpoint
from kproxy.model.node import NodeInfo
from kproxy.model.service import NamespacedName, Protocol, ServicePort, ServicePortName
from kproxy.plan.nftables.planner import NftablesPlanner, render_nftables_plan

REPO = Path(__file__).resolve().parents[2]
NODE = "node-a"
CONFIGS = (
    ProxyConfig(),
    ProxyConfig(cluster_cidrs=("10.0.0.0/8", "fd00:10::/48")),
    ProxyConfig(masquerade_all=True, cluster_cidrs=("10.1.0.0/12",)),
    ProxyConfig(detect_local_mode="InterfaceNamePrefix", interface_name_prefix="veth"),
    ProxyConfig(node_port_addresses=("172.31.0.0/24", "fd00:31::/64")),
)


def _address(family: int, net: int, host: int) -> str:
    return f"10.{net}.0.{host}" if family == 4 else f"fd00:{net}::{host:x}"


@st.composite
def clusters(draw: st.DrawFn, family: int) -> tuple[dict[Any, Any], dict[Any, Any]]:
    services: dict[ServicePortName, ServicePort] = {}
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i in range(draw(st.integers(1, 4))):
        proto = draw(st.sampled_from(list(Protocol)))
        name = ServicePortName(
            NamespacedName("ns", f"svc{i}"), draw(st.sampled_from(["", "http"])), proto
        )
        lb = draw(st.lists(st.integers(1, 3), max_size=1))
        services[name] = ServicePort(
            name=name,
            cluster_ips=(_address(family, 96, i + 1),),
            port=draw(st.integers(1, 65535)),
            node_port=draw(st.sampled_from([0, 30080, 30081])),
            session_affinity_seconds=draw(st.sampled_from([None, 10800, 90])),
            external_ips=tuple(
                _address(family, 200, n)
                for n in draw(st.lists(st.integers(1, 3), max_size=2, unique=True))
            ),
            load_balancer_ips=tuple(_address(family, 201, n) for n in lb),
            load_balancer_source_ranges=draw(
                st.sampled_from(
                    [(), ("10.2.0.0/16", "fd00:2::/64"), ("10.3.4.0/23", "fd00:3::/60")]
                )
            ),
            external_policy_local=draw(st.booleans()),
            internal_policy_local=draw(st.booleans()),
        )
        endpoints[name] = tuple(
            Endpoint(
                _address(family, 50 + i, j + 1),
                draw(st.integers(1, 65535)),
                ready=draw(st.booleans()),
                serving=True,
                terminating=draw(st.booleans()),
                node_name=draw(st.sampled_from([NODE, "node-b"])),
            )
            for j in range(draw(st.integers(0, 3)))
        )
    return services, endpoints


@pytest.mark.parametrize("family", [4, 6])
@settings(
    max_examples=5,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_netlink_writer_matches_nft_loading_the_rendered_text(
    namespaces: tuple[Namespace, Namespace], family: int, data: st.DataObject, tmp_path: Path
) -> None:
    services, endpoints = data.draw(clusters(family))
    config = data.draw(st.sampled_from(CONFIGS))
    node = NodeInfo(NODE, local_addresses=("172.31.0.2", "fd00:31::2"))
    plan = NftablesPlanner(config).plan(services, endpoints, node, (family,))
    written, loaded = namespaces
    for ns in namespaces:
        ns.run("nft", "flush", "ruleset")
    path = tmp_path / "plan.pickle"
    path.write_bytes(pickle.dumps(plan))
    subprocess.run(
        written.argv(sys.executable, "-m", "integration.nft_write", str(path)),
        check=True,
        cwd=REPO,
    )
    loaded.run("nft", "-f", "-", input=render_nftables_plan(plan, family))

    nft_family = "ip" if family == 4 else "ip6"
    assert nft_listing(written, nft_family) == nft_listing(loaded, nft_family)
