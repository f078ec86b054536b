"""ServiceCIDRs outside the agent's watch: a kind the manifests carry (files, directories,
`kubectl get -o yaml` Lists), one the one-off API read lists (none where the API server does not
serve them or RBAC forbids), and the node of every command (`dump`, `dump --diff`, `trace`,
`sync --once`, `run --manifests`) carrying them exactly as the agent's node does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from structlog.testing import capture_logs

from kproxy.inspect.dump_cmd import dump_planned
from kproxy.inspect.inputs import build_state, node_and_config, read_manifests
from kproxy.inspect.trace_cmd import TraceRequest, trace_request
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.rules.explain import Outcome
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import set_node, set_service_cidrs
from kproxy.sync.modes import MODES
from kproxy.sync.once import once_loop
from kproxy.watch.api import ApiListError, ApiSource
from kproxy.watch.files import ManifestSource
from kproxy.watch.manifests import Manifests, load_manifests
from tests.watch.test_file_source import RecordingSink, service

NODE = "node-a"
CONFIG = "kind: KubeProxyConfiguration\nmode: nftables\n"


def service_cidr(name: str, *cidrs: Any, api_version: str = "networking.k8s.io/v1") -> Any:
    return {
        "apiVersion": api_version,
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }


def write(path: Path, *docs: Any) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


def agent_cidrs(*objs: Any) -> tuple[str, ...]:
    """What the agent's node carries after listing `objs`."""
    state = ClusterState()
    set_node(NODE, [])(state)
    set_service_cidrs(list(objs))(state)
    assert state.node is not None
    return state.node.service_cidrs


def test_manifests_carry_service_cidrs_from_files_directories_and_lists(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", service("web", "172.30.0.10"), service_cidr("kubernetes", "1/8"))
    typed_list = {  # `kubectl get servicecidrs -o yaml` prints a List; a typed one omits kinds
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDRList",
        "items": [{"metadata": {"name": "extra"}, "spec": {"cidrs": ["10.1.0.0/24"]}}],
    }
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text(json.dumps(typed_list))
    write(tmp_path / "c.yaml", {"apiVersion": "v1", "kind": "List", "items": [service_cidr("x")]})
    found = load_manifests(tmp_path)
    assert [o["metadata"]["name"] for o in found.service_cidrs] == ["kubernetes", "x", "extra"]
    assert found.service_cidrs[2]["apiVersion"] == "networking.k8s.io/v1"
    assert found.warnings == [] and found.holds_objects()
    assert load_manifests(tmp_path / "a.yaml").service_cidrs[0]["spec"] == {"cidrs": ["1/8"]}


def test_a_service_cidr_of_another_api_version_is_one_warning() -> None:
    found = Manifests()
    found.add(service_cidr("old", "10.0.0.0/8", api_version="networking.k8s.io/v1beta1"), "f")
    assert found.service_cidrs == []
    assert len(found.warnings) == 1 and "ServiceCIDR apiVersion" in found.warnings[0]


def _inputs(tmp_path: Path, *docs: Any) -> tuple[NodeInfo, ClusterState, list[Any]]:
    manifests_dir = tmp_path / "m"
    manifests_dir.mkdir()
    write(manifests_dir / "all.yaml", *docs)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    with capture_logs() as logs:
        manifests = read_manifests(str(manifests_dir))
        node, proxy_config = node_and_config(manifests, str(config), NODE)
        state = build_state(manifests, proxy_config)
    return node, state, logs


def test_the_commands_node_carries_the_service_cidrs_as_the_agents_does(tmp_path: Path) -> None:
    objs = [service_cidr("kubernetes", "172.30.0.0/16", "fd00:30::/112"), service_cidr("b")]
    objs.append(service_cidr("extra", "10.1.0.0/24", "172.30.0.0/16"))
    node, state, logs = _inputs(tmp_path, service("web", "172.30.0.10"), *objs)
    assert node.service_cidrs == agent_cidrs(*objs)
    assert node.service_cidrs == ("10.1.0.0/24", "172.30.0.0/16", "fd00:30::/112")
    assert logs == []
    # `sync --once`: its loop's state gives the node the same ranges.
    config = ProxyConfig(mode="nftables")
    loop = once_loop(state, node, config, MODES["nftables"], object())  # type: ignore[arg-type]
    assert loop.box.state.node is not None
    assert loop.box.state.node.service_cidrs == node.service_cidrs


def test_a_bad_service_cidr_is_one_warning_naming_object_and_field(tmp_path: Path) -> None:
    bad = service_cidr("kubernetes", "172.30.0.0/16", "not-a-cidr")
    broken = {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {}}
    node, _, logs = _inputs(tmp_path, bad, broken, service_cidr("extra", "10.1.0.0/24"))
    assert node.service_cidrs == ("10.1.0.0/24", "172.30.0.0/16")
    skipped = [(e["object"], e["field"]) for e in logs if e["event"] == "object_skipped"]
    assert skipped == [
        ("ServiceCIDR kubernetes", "spec.cidrs[1]"),
        ("ServiceCIDR '?'", "metadata.name"),
    ]


def test_dump_and_trace_plan_the_drop_of_unallocated_addresses(tmp_path: Path) -> None:
    write(tmp_path / "m.yaml", service("web", "172.30.0.10"), service_cidr("k", "172.30.0.0/16"))
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    dumped = dump_planned(str(tmp_path / "m.yaml"), 4, str(config), NODE)
    assert "ip daddr 172.30.0.0/16 drop" in dumped
    request = TraceRequest("tcp", "172.30.9.9:80", "10.99.0.7")
    traced = trace_request(
        request, [str(tmp_path / "m.yaml")], ["10.0.0.1"], 1.0, str(config), NODE
    )
    assert traced.outcome is Outcome.DROPPED


class _Response:
    def __init__(self, items: list[Any]) -> None:
        self.data = json.dumps({"metadata": {"resourceVersion": "1"}, "items": items}).encode()


def _api_source(cidrs: Any) -> ApiSource:
    source = ApiSource(ApiClient(), NODE)
    for resource in source.resources:
        if resource.kind is Kind.SERVICE_CIDR:
            resource.list_fn = cidrs
        else:
            resource.list_fn = lambda **_: _Response([])
    return source


def test_the_one_off_api_read_lists_service_cidrs() -> None:
    objs = [service_cidr("kubernetes", "172.30.0.0/16")]
    found = _api_source(lambda **_: _Response(objs)).list_once()
    assert found.service_cidrs == objs


@pytest.mark.parametrize("status", [403, 404])
def test_the_one_off_api_read_without_the_resource_lists_none(status: int) -> None:
    def refuse(**_: Any) -> None:
        raise ApiException(status=status)

    with capture_logs() as logs:
        found = _api_source(refuse).list_once()
    assert found.service_cidrs == []
    assert [(e["event"], e["kind"], e["status"]) for e in logs] == [
        ("resource_unavailable", "ServiceCIDR", status)
    ]


def test_the_one_off_api_read_fails_on_another_error() -> None:
    def fail(**_: Any) -> None:
        raise ApiException(status=500)

    with pytest.raises(ApiListError, match="ServiceCIDR"):
        _api_source(fail).list_once()


def test_the_file_source_carries_service_cidrs_to_the_node(tmp_path: Path) -> None:
    """`run --manifests`: listed with the rest (the first sync waits for it), changed and
    removed with their file."""
    write(tmp_path / "svc.yaml", service("web", "172.30.0.10"))
    cidrs = write(tmp_path / "cidrs.yaml", service_cidr("kubernetes", "172.30.0.0/16"))
    sink = RecordingSink()
    set_node(NODE, [])(sink.state)
    source = ManifestSource(str(tmp_path), NODE, use_inotify=False)
    source.poll(sink)
    assert Kind.SERVICE_CIDR in sink.synced_kinds
    assert sink.state.node is not None
    assert sink.state.node.service_cidrs == ("172.30.0.0/16",)
    write(cidrs, service_cidr("kubernetes", "172.31.0.0/16"), service_cidr("b", "10.2.0.0/24"))
    source.reload(sink, [str(cidrs)])
    assert sink.state.node.service_cidrs == ("10.2.0.0/24", "172.31.0.0/16")
    cidrs.unlink()
    source.reload(sink, [str(cidrs)])
    assert sink.state.node.service_cidrs == ()
    assert sink.cluster_ips() == {"web": "172.30.0.10"}
