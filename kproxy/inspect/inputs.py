"""What the commands read before they act: the config file, manifests or the API server's
objects, this node, and (without --config) the mode the kernel shows. `sync` and `run` use it as
the inspection commands do.

The layers a command needs are imported in the function that needs them: `kproxy --help` (and a
command that needs no kernel library, cluster client or sync machinery) starts without them."""

from __future__ import annotations

import dataclasses
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import yaml

from kproxy.errors import ConfigError, InvalidObjectError, at_line, describe_yaml_error
from kproxy.model.config import ProxyConfig, with_flags
from kproxy.model.config_fields import suggest_field
from kproxy.model.node import NodeInfo
from kproxy.state.ingest import node_for
from kproxy.watch.manifests import (
    Manifests,
    load_manifests,
    log_ignored_documents,
    node_with_service_cidrs,
    state_from_manifests,
    warn_empty,
)

if TYPE_CHECKING:
    from kproxy.state.cluster import ClusterState

log = structlog.get_logger("kproxy")


def read_config_doc(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    where = f"--config {path}"
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read ({reason})", where=where) from exc
    except yaml.YAMLError as exc:
        line, problem = describe_yaml_error(exc)
        raise ConfigError(at_line(line, problem), where=where) from exc
    except RecursionError as exc:  # absurdly deep nesting: the constructor recurses per level
        raise ConfigError("nested too deeply", where=where) from exc
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError("expected a KubeProxyConfiguration mapping", where=where)
    return doc or {}


def load_config_file(path: str | None, flags: Mapping[str, Any] | None = None) -> ProxyConfig:
    """The config file (if any) with explicitly given kube-proxy flags laid over it."""
    config, ignored = with_flags(read_config_doc(path), flags or {})
    for field in ignored:
        suggestion = suggest_field(field)
        if suggestion:
            log.warning("config_field_ignored", field=field, file=path, did_you_mean=suggestion)
        else:
            log.warning("config_field_ignored", field=field, file=path)
    return config


def resolve_hostname(flag: str | None, config: ProxyConfig) -> str:
    """As kube-proxy: --hostname-override, then the config's hostnameOverride, then the host."""
    return (flag or config.hostname_override or socket.gethostname()).strip().lower()


def read_manifests(path: str, convert_slices: bool = True) -> Manifests:
    """The manifests under `path`, for build_state; their EndpointSlices are converted as they
    are read unless `convert_slices` is False (see ConvertedSlices)."""
    manifests = load_manifests(path, convert_slices)
    log_ignored_documents(manifests)
    warn_empty(manifests, path)
    return manifests


def read_all_manifests(paths: Sequence[str]) -> Manifests:
    """Several files or directories as one set of objects."""
    merged = Manifests()
    for path in paths:
        merged.extend(read_manifests(path, convert_slices=False))
    return merged


def read_cluster_objects(
    kubeconfig: str | None, config: ProxyConfig, hostname: str | None
) -> Manifests:
    """The Services, EndpointSlices, this Node and the ServiceCIDRs the API server holds now
    (one list each; no ServiceCIDR where the API server does not serve them or RBAC forbids)."""
    from kproxy.watch.api import ApiSource, api_client

    api = api_client(kubeconfig or config.kubeconfig or None)
    return ApiSource(api, resolve_hostname(hostname, config)).list_once()


def node_families() -> tuple[int, ...]:
    """The families the agent programs here (dataplane/host.py's, imported when asked)."""
    from kproxy.dataplane.host import node_families as families

    return families()


def report_invalid(exc: InvalidObjectError) -> None:
    log.warning("object_skipped", object=exc.obj, field=exc.field, problem=exc.problem)


def build_state(manifests: Manifests, config: ProxyConfig) -> ClusterState:
    return state_from_manifests(manifests, report_invalid, config)


def with_host_facts(node: NodeInfo) -> NodeInfo:
    from kproxy.dataplane.host import with_host_facts as complete

    return complete(node)


def local_addresses() -> tuple[str, ...]:
    from kproxy.dataplane.host import read_local_addresses

    return read_local_addresses()


def in_live_mode(config: ProxyConfig, config_path: str | None, family: int) -> ProxyConfig:
    """The config for reading this node's live rules: without --config, in the mode the kernel
    shows (see live_mode.py), said in one line on stderr."""
    from kproxy.inspect.live_mode import describe_mode, detect_live_mode

    if config_path is not None:
        return config
    live = detect_live_mode(family)
    print(describe_mode(live), file=sys.stderr)
    return dataclasses.replace(config, mode=live.mode)


def node_and_config(
    manifests: Manifests, config_path: str | None, hostname: str | None
) -> tuple[NodeInfo, ProxyConfig]:
    config = load_config_file(config_path)
    name = resolve_hostname(hostname, config)
    try:
        node = node_for(name, manifests.nodes)
    except InvalidObjectError as exc:
        report_invalid(exc)
        node = NodeInfo(name=name)
    for skipped in node.skipped:
        report_invalid(skipped)
    # The ServiceCIDRs ride with the node, as they do in the agent (ClusterState.node).
    return node_with_service_cidrs(node, manifests), config
