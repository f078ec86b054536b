"""The `kproxy` command: the one place that wires sources, state, plan and dataplane together."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import structlog
import yaml

from kproxy.errors import (
    ConfigError,
    InvalidObjectError,
    KproxyError,
    at_line,
    describe_yaml_error,
)
from kproxy.logs import LEVELS, configure_logging
from kproxy.model.config import ProxyConfig, with_flags
from kproxy.model.config_fields import BY_FLAG, FIELDS, IPTABLES_BACKENDS, suggest_field
from kproxy.model.config_values import GO_FALSE, GO_TRUE, parse_go_bool
from kproxy.model.node import NodeInfo
from kproxy.state.ingest import node_for
from kproxy.watch.manifests import Manifests, load_manifests, log_ignored_documents

if TYPE_CHECKING:
    from kproxy.state.cluster import ClusterState
    from kproxy.sync.agent import SourceStarter

# The commands import the layers they use in their bodies: `kproxy --help` (and a command that
# needs no kernel library or sync machinery) starts without loading them.
log = structlog.get_logger("kproxy")
F = TypeVar("F", bound=Callable[..., Any])


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


def read_manifests(path: str) -> Manifests:
    manifests = load_manifests(path)
    log_ignored_documents(manifests)
    if not (manifests.services or manifests.endpoint_slices or manifests.nodes):
        log.warning("manifests_empty", path=path, problem="no Service, EndpointSlice or Node")
    return manifests


def read_all_manifests(paths: Sequence[str]) -> Manifests:
    """Several files or directories as one set of objects."""
    merged = Manifests()
    for path in paths:
        one = read_manifests(path)
        merged.services += one.services
        merged.endpoint_slices += one.endpoint_slices
        merged.nodes += one.nodes
    return merged


def node_families() -> tuple[int, ...]:
    """The families the agent programs here: IPv4, and IPv6 where the namespace has it."""
    from kproxy.dataplane.host import ipv6_supported

    return (4, 6) if ipv6_supported() else (4,)


def _report_invalid(exc: InvalidObjectError) -> None:
    log.warning("object_skipped", object=exc.obj, field=exc.field, problem=exc.problem)


def _state(manifests: Manifests, config: ProxyConfig) -> ClusterState:
    from kproxy.sync.once import state_from_manifests

    return state_from_manifests(manifests, _report_invalid, config)


def _with_host_facts(node: NodeInfo) -> NodeInfo:
    from kproxy.dataplane.host import with_host_facts

    return with_host_facts(node)


def _local_addresses() -> tuple[str, ...]:
    from kproxy.dataplane.host import read_local_addresses

    return read_local_addresses()


def in_live_mode(config: ProxyConfig, config_path: str | None, family: int) -> ProxyConfig:
    """The config for reading this node's live rules: without --config, in the mode the kernel
    shows (see inspect/live_mode.py), said in one line on stderr."""
    from kproxy.inspect.live_mode import describe_mode, detect_live_mode

    if config_path is not None:
        return config
    live = detect_live_mode(family)
    click.echo(describe_mode(live), err=True)
    return dataclasses.replace(config, mode=live.mode)


def _node_and_config(
    manifests: Manifests, config_path: str | None, hostname: str | None
) -> tuple[NodeInfo, ProxyConfig]:
    config = load_config_file(config_path)
    name = resolve_hostname(hostname, config)
    try:
        node = node_for(name, manifests.nodes)
    except InvalidObjectError as exc:
        _report_invalid(exc)
        node = NodeInfo(name=name)
    for skipped in node.skipped:
        _report_invalid(skipped)
    return node, config


# The DaemonSet sets it, so `kubectl exec ds/kproxy -- kproxy status` (or trace, dump) reads
# the agent's own config.
CONFIG_ENV = "KPROXY_CONFIG"


def common_options(fn: F) -> F:
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        envvar=CONFIG_ENV,
        help="A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1); default: "
        f"${CONFIG_ENV} (the DaemonSet sets it to its config). Masquerade and sync settings: "
        "the nftables mode reads its nftables: section, the other modes its iptables: section.",
    )(fn)
    fn = click.option(
        "--hostname-override",
        "hostname",
        metavar="NAME",
        help="The node name, instead of the host's name.",
    )(fn)
    return fn


lock_timeout_option = click.option(
    "--lock-timeout",
    type=float,
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for /run/xtables.lock (XTABLES_LOCKFILE moves it) before giving up.",
)


@click.group()
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
def cli(log_level: str) -> None:
    """kproxy: kube-proxy in Python, in its iptables, nftables and userspace modes."""
    configure_logging(log_level)


@cli.command()
@click.option("--once", is_flag=True, required=True, help="Program the tables once and exit.")
@click.option(
    "--manifests",
    "manifests_path",
    required=True,
    type=click.Path(exists=True),
    help="YAML/JSON file or directory with Services, EndpointSlices and Nodes.",
)
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Sync even when the manifests hold no Service: that removes every service rule.",
)
@click.option(
    "--iptables-backend",
    type=click.Choice(IPTABLES_BACKENDS),
    default=None,
    help="iptables mode: auto (as kubelet), legacy or nft (iptablesBackend in --config).",
)
@lock_timeout_option
@common_options
def sync(
    once: bool,
    manifests_path: str,
    allow_empty: bool,
    iptables_backend: str | None,
    lock_timeout: float,
    config_path: str | None,
    hostname: str | None,
) -> None:
    """Program this network namespace's netfilter tables from manifests.

    In userspace mode (`mode: userspace` in --config) it programs the portals and then relays
    connections in the foreground until SIGTERM or Ctrl-C: it does not return before that."""
    from kproxy.sync.modes import proxy_mode
    from kproxy.sync.once import once_loop, refuse_empty_input, sync_once

    manifests = read_manifests(manifests_path)
    node, config = _node_and_config(manifests, config_path, hostname)
    if iptables_backend:
        config = dataclasses.replace(config, iptables_backend=iptables_backend)
    state = _state(manifests, config)
    if not allow_empty:
        refuse_empty_input(state, manifests_path)
    mode = proxy_mode(config)
    with mode.open_dataplane(config, lock_timeout) as dataplane:  # refuses first if not root
        loop = once_loop(state, _with_host_facts(node), config, mode, dataplane)
        report = sync_once(loop)
        click.echo(report.summary(process_seconds()))
        if mode.serves_in_process:
            click.echo("relaying connections (userspace mode) until SIGTERM or Ctrl-C", err=True)
            _wait_for_stop_signal()
            mode.on_stop(loop)


def process_seconds() -> float:
    """How long this process has run, from its exec (interpreter start-up and imports included),
    to the kernel's 10 ms tick: /proc/self/stat's start time against the boot clock."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks
    except (OSError, ValueError, IndexError):
        return time.process_time()  # no /proc: the CPU time, a lower bound
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)


def _wait_for_stop_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


# Planned userspace rules name no relay port: sync binds the listeners, and the kernel picks them.
RELAY_PORT_NOTE = (
    "# port 0 (--to-ports 0, --to-destination ADDRESS:0, --dport 0) stands for a relay "
    "listener's port, which sync picks when it binds the listener; `kproxy dump` without "
    "--manifests shows the ports in use\n"
)


@cli.command()
@click.option(
    "--manifests",
    "manifests_path",
    type=click.Path(exists=True),
    help="Print what sync would write for these manifests instead of the live rules.",
)
@click.option(
    "--family",
    type=click.Choice(["4", "6"]),
    default=None,
    help="IPv4 (iptables) or IPv6 (ip6tables) rules [default: 4; with --diff, both].",
)
@click.option(
    "--diff",
    "show_diff",
    is_flag=True,
    help="Print what the next sync would change in this node's tables, as a unified diff per "
    "chain, for --manifests or (without it) the objects the API server holds; exit 1 when "
    "anything would change.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False),
    help="With --diff and no --manifests: the kubeconfig (default as `run`: the config's "
    "clientConnection.kubeconfig, in-cluster credentials, KUBECONFIG or ~/.kube/config).",
)
@lock_timeout_option
@common_options
def dump(
    manifests_path: str | None,
    family: str | None,
    show_diff: bool,
    kubeconfig: str | None,
    lock_timeout: float,
    config_path: str | None,
    hostname: str | None,
) -> None:
    """Print kproxy's rules as the mode's own tools show them: iptables-save format in the
    iptables and userspace modes, `nft list table` in the nftables mode."""
    from kproxy.sync.modes import proxy_mode

    if show_diff:
        _dump_diff(manifests_path, kubeconfig, family, lock_timeout, config_path, hostname)
        return
    if manifests_path is None:
        config = in_live_mode(load_config_file(config_path), config_path, int(family or 4))
        text = proxy_mode(config).read_live(int(family or 4))
    else:
        manifests = read_manifests(manifests_path)
        node, config = _node_and_config(manifests, config_path, hostname)
        state = _state(manifests, config)
        mode = proxy_mode(config)
        plan = mode.planner(config).plan(
            state.services_map(), state.endpoints_map(), _with_host_facts(node), (int(family or 4),)
        )
        text = mode.render_plan(plan, int(family or 4))
        if mode.serves_in_process:
            text = RELAY_PORT_NOTE + text
    sys.stdout.write(text)


def _dump_diff(
    manifests_path: str | None,
    kubeconfig: str | None,
    family: str | None,
    lock_timeout: float,
    config_path: str | None,
    hostname: str | None,
) -> None:
    from kproxy.inspect.diff_cmd import diff_next_sync, render_diffs

    if manifests_path is not None:
        manifests = read_manifests(manifests_path)
    else:
        from kproxy.watch.api import ApiSource, api_client

        config = load_config_file(config_path)
        api = api_client(kubeconfig or config.kubeconfig or None)
        manifests = ApiSource(api, resolve_hostname(hostname, config)).list_once()
    node, config = _node_and_config(manifests, config_path, hostname)
    families = (int(family),) if family else node_families()
    config = in_live_mode(config, config_path, families[0])
    state = _state(manifests, config)
    diffs = diff_next_sync(state, _with_host_facts(node), config, families, lock_timeout)
    sys.stdout.write(render_diffs(diffs))
    sys.exit(1 if diffs else 0)


@cli.command()
@lock_timeout_option
def cleanup(lock_timeout: float) -> None:
    """Remove every mode's rules: the iptables and userspace modes' chains and jump rules
    (kproxy's or kube-proxy's) and both families' `kube-proxy` nftables tables."""
    from kproxy.dataplane.host import route_localnet_left
    from kproxy.dataplane.nftables.node import delete_nftables_tables
    from kproxy.sync.modes import proxy_mode

    with proxy_mode(ProxyConfig()).open_dataplane(ProxyConfig(), lock_timeout) as dataplane:
        result = dataplane.cleanup()
    removed_jumps = sum(len(p) for t in result.tables for p in t.remove_jumps.values())
    click.echo(f"removed {result.chains_removed} chains and {removed_jumps} jump rules")
    tables = delete_nftables_tables()  # the nftables mode's, kproxy's or upstream's
    if tables:
        click.echo(f"removed {tables} nftables table{'s' if tables > 1 else ''} (kube-proxy)")
    if route_localnet_left():
        click.echo(
            "left net.ipv4.conf.all.route_localnet=1 (another program may need it; KUBE-FIREWALL "
            "still guards it): `sysctl -w net.ipv4.conf.all.route_localnet=0` if nothing does"
        )


class GoBool(click.ParamType[bool]):
    """A boolean in Go's forms only (strconv.ParseBool), as kube-proxy's flags take them."""

    name = "boolean"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        parsed = parse_go_bool(str(value))
        if parsed is None:
            forms = ", ".join(GO_TRUE + GO_FALSE)
            self.fail(f"{value!r} is not a boolean; use true or false ({forms})", param, ctx)
        return parsed


# Declared by common_options, as sync and dump take it too.
_COMMON_FLAGS = ("--hostname-override",)


def kube_proxy_flags(fn: F) -> F:
    """kube-proxy's own flags, under the same names, so its DaemonSet's command line works."""
    for f in reversed(FIELDS):
        if f.flag is None or f.flag in _COMMON_FLAGS:
            continue
        help_text = f"{f.help.rstrip('.')} ({f.help_path})."
        if f.flag_type is bool:  # as Go's flags: `--masquerade-all` or `--masquerade-all=false`
            option = click.option(
                f.flag, type=GoBool(), is_flag=False, flag_value=True, default=None, help=help_text
            )
        else:
            option = click.option(f.flag, type=f.flag_type, default=None, help=help_text)
        fn = option(fn)
    return fn


def given_flags(params: Mapping[str, Any]) -> dict[str, Any]:
    """The kube-proxy flags given on the command line, by flag name."""
    flags: dict[str, Any] = {}
    for flag in BY_FLAG:
        value = params.get(flag[2:].replace("-", "_"))
        if value is not None:
            flags[flag] = value
    return flags


@cli.command()
@click.option(
    "--manifests",
    "manifests_path",
    type=click.Path(exists=True),
    help="Read Services, EndpointSlices and Nodes from files (re-read on change), not the API.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False),
    help="Kubeconfig file; default: the config's clientConnection.kubeconfig, in-cluster "
    "credentials, KUBECONFIG or ~/.kube/config.",
)
@lock_timeout_option
@click.option("--cleanup", "cleanup_only", is_flag=True, help="Remove the rules and exit.")
@click.option("--v", "verbosity", type=int, default=None, help="kube-proxy's log verbosity.")
@kube_proxy_flags
@common_options
def run(
    manifests_path: str | None,
    kubeconfig: str | None,
    lock_timeout: float,
    cleanup_only: bool,
    verbosity: int | None,
    config_path: str | None,
    hostname: str | None,
    **params: Any,
) -> None:
    """Keep this node's rules in sync with the cluster until stopped (SIGTERM leaves the rules).

    kube-proxy's flags are accepted under their own names; a flag given on the command line
    overrides the same field of the --config file."""
    if verbosity is not None and verbosity >= 4:
        configure_logging("debug")
    flags = given_flags(params)
    if hostname:
        flags["--hostname-override"] = hostname
    config = load_config_file(config_path, flags)
    if cleanup_only:
        click.get_current_context().invoke(cleanup, lock_timeout=lock_timeout)
        return
    from kproxy.sync.agent import run_agent
    from kproxy.watch.files import ManifestSource

    node_name = resolve_hostname(None, config)
    if manifests_path is not None:
        start_source: SourceStarter = ManifestSource(manifests_path, node_name).start
    else:
        from kproxy.watch.api import ApiSource, api_client

        api = api_client(kubeconfig or config.kubeconfig or None)
        start_source = ApiSource(api, node_name).start
    run_agent(config, node_name, start_source, lock_timeout)


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="The KubeProxyConfiguration kproxy runs with (conntrack limits, CIDRs).",
)
@click.option(
    "--service-cidr",
    metavar="CIDR",
    help="The cluster's Service range, to check that a route covers it "
    "(default 10.96.0.0/12, kubeadm's).",
)
def doctor(config_path: str | None, service_cidr: str | None) -> None:
    """Check this node for what kproxy needs; exit 1 if a check fails."""
    from kproxy.doctor import exit_code, render_report, run_checks

    checks = run_checks(load_config_file(config_path), service_cidr)
    click.echo(render_report(checks), nl=False)
    sys.exit(exit_code(checks))


@cli.command()
@click.argument("protocol", type=click.Choice(["tcp", "udp", "sctp"], case_sensitive=False))
@click.argument("destination", metavar="DST:PORT")
@click.option(
    "--from",
    "source",
    metavar="SRC",
    help="The client's address: a pod's or an outside client's (the packet enters nat "
    "PREROUTING), or one of the node's own (nat OUTPUT). Default: the node itself.",
)
@click.option(
    "--in-interface",
    metavar="IF",
    help="The interface the packet arrives on (for detectLocalMode BridgeInterface or "
    "InterfaceNamePrefix).",
)
@click.option(
    "--manifests",
    "manifests_paths",
    multiple=True,
    type=click.Path(exists=True),
    help="Trace through what kproxy would write for these objects (no root needed) instead of "
    "the live tables; may be given more than once.",
)
@click.option(
    "--node-address",
    "node_addresses",
    multiple=True,
    metavar="IP",
    help="The node's own addresses (repeatable); default: this network namespace's.",
)
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@lock_timeout_option
@common_options
def trace(
    protocol: str,
    destination: str,
    source: str | None,
    in_interface: str | None,
    manifests_paths: tuple[str, ...],
    node_addresses: tuple[str, ...],
    output: str,
    lock_timeout: float,
    config_path: str | None,
    hostname: str | None,
) -> None:
    """Where a connection from SRC to DST:PORT goes through this node's rules, and why."""
    from kproxy.inspect.trace_cmd import TraceRequest, request_family, trace_live, trace_planned
    from kproxy.inspect.trace_view import render_trace, trace_json

    request = TraceRequest(protocol, destination, source, in_interface)
    if manifests_paths:
        manifests = read_all_manifests(manifests_paths)
        node, config = _node_and_config(manifests, config_path, hostname)
        state = _state(manifests, config)
        local = node_addresses or _local_addresses()
        node = dataclasses.replace(node, local_addresses=tuple(local))
        explanation = trace_planned(request, state, node, config)
    else:
        config = in_live_mode(load_config_file(config_path), config_path, request_family(request))
        local = node_addresses or _local_addresses()
        node = NodeInfo(name=resolve_hostname(hostname, config))
        explanation = trace_live(request, config, local, node, lock_timeout)
    if output == "json":
        click.echo(json.dumps(trace_json(explanation), indent=2))
    else:
        click.echo(render_trace(explanation), nl=False)


@cli.command()
@click.argument("service", metavar="[NAMESPACE/NAME]", required=False)
@click.option(
    "--manifests",
    "manifests_paths",
    multiple=True,
    type=click.Path(exists=True),
    help="Services and EndpointSlices from these files (repeatable); default: the API.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False),
    help="Without --manifests: the kubeconfig (default as `run`).",
)
@click.option("--endpoint", metavar="IP", help="Only the flows that go to this endpoint.")
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@common_options
def connections(
    service: str | None,
    manifests_paths: tuple[str, ...],
    kubeconfig: str | None,
    endpoint: str | None,
    output: str,
    config_path: str | None,
    hostname: str | None,
) -> None:
    """The node's live conntrack flows of kproxy's services, by service port and endpoint."""
    from kproxy.inspect.connections_cmd import live_connections, render

    config = load_config_file(config_path)
    if manifests_paths:
        manifests = read_all_manifests(manifests_paths)
    else:
        from kproxy.watch.api import ApiSource, api_client

        api = api_client(kubeconfig or config.kubeconfig or None)
        manifests = ApiSource(api, resolve_hostname(hostname, config)).list_once()
    config, state = in_live_mode(config, config_path, 4), _state(manifests, config)
    local, families = _local_addresses(), node_families()
    found = live_connections(state, local, config.mode, families, service, endpoint)
    click.echo(render(found, config.mode, output), nl=False)


@cli.command()
@click.option(
    "--address",
    metavar="HOST:PORT",
    help="The agent's metrics server (it serves /statusz); default: the config's "
    "metricsBindAddress (a wildcard address asks 127.0.0.1).",
)
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="The agent's config."
)
def status(address: str | None, output: str, config_path: str | None) -> None:
    """What the running agent reports: mode, last sync, durations, skipped objects, sources."""
    from kproxy.inspect.status_cmd import fetch_status, render_status, status_url

    config = load_config_file(config_path)
    body = fetch_status(status_url(address or config.metrics_bind_address))
    if output == "json":
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo(render_status(body), nl=False)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    except KproxyError as exc:
        # Said once, as a plain line like click's usage errors: a log line as well only repeated
        # it. Whatever led up to it was logged where it happened.
        click.echo(f"kproxy: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
