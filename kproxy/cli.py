"""The `kproxy` command: declares the commands and their options; each calls into the layer that
does the work (inspect/ for dump, trace, connections and status and for what every command reads,
sync/ for sync and run, doctor/). A command imports what it uses in its body, so `kproxy --help`
(and a command that needs no kernel library, cluster client or sync machinery) starts without
loading them: bench/cli_startup.py measures it."""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from kproxy.errors import KproxyError
from kproxy.inspect.flags import given_flags, kube_proxy_flags
from kproxy.logs import LEVELS, configure_logging
from kproxy.model.config_fields import IPTABLES_BACKENDS

if TYPE_CHECKING:
    from kproxy.sync.agent import SourceStarter

F = TypeVar("F", bound=Callable[..., Any])


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
    help="YAML/JSON file or directory with Services, EndpointSlices, ServiceCIDRs and Nodes.",
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
    from kproxy.inspect.inputs import build_state, node_and_config, read_manifests, with_host_facts
    from kproxy.sync.modes import proxy_mode
    from kproxy.sync.once import once_loop, refuse_empty_input, sync_once

    # One sync, then exit: the cyclic collector's passes over the manifests', the state's and
    # the plan's millions of objects (seconds at 10,000 services) would free nothing of theirs.
    gc.disable()
    manifests = read_manifests(manifests_path)
    node, config = node_and_config(manifests, config_path, hostname)
    if iptables_backend:
        config = dataclasses.replace(config, iptables_backend=iptables_backend)
    state = build_state(manifests, config)
    if not allow_empty:
        refuse_empty_input(state, manifests_path)
    mode = proxy_mode(config)
    # Refuses first if not root.
    with mode.open_dataplane(config, lock_timeout, once=True) as dataplane:
        loop = once_loop(state, with_host_facts(node), config, mode, dataplane)
        del state  # the loop's: it lets go of it once planned
        report = sync_once(loop)
        click.echo(report.summary(process_seconds()))
        if mode.serves_in_process:
            gc.enable()  # the relay runs on
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
    if show_diff:
        from kproxy.inspect.diff_cmd import show_diff as diff_text

        args = (kubeconfig, int(family) if family else None, lock_timeout, config_path, hostname)
        text = diff_text(manifests_path, *args)
        sys.stdout.write(text)
        sys.exit(1 if text else 0)
    from kproxy.inspect.dump_cmd import dump_live, dump_planned

    if manifests_path is None:
        sys.stdout.write(dump_live(config_path, int(family or 4)))
    else:
        sys.stdout.write(dump_planned(manifests_path, int(family or 4), config_path, hostname))


@cli.command()
@lock_timeout_option
def cleanup(lock_timeout: float) -> None:
    """Remove every mode's rules, kproxy's or kube-proxy's: the iptables and userspace modes'
    chains and jump rules, and both families' `kube-proxy` nftables tables."""
    from kproxy.dataplane.host import route_localnet_left
    from kproxy.sync.modes import remove_every_mode

    removed = [t for t in remove_every_mode(lock_timeout) if not t.empty]
    chains = sum(len(t.delete) for t in removed)
    jumps = sum(len(p) for t in removed for p in t.remove_jumps.values())
    where = ", ".join(dict.fromkeys(t.table for t in removed))
    click.echo(f"removed {chains} chains and {jumps} jump rules" + (f" ({where})" if where else ""))
    if route_localnet_left():
        click.echo(
            "left net.ipv4.conf.all.route_localnet=1 (another program may need it; KUBE-FIREWALL "
            "still guards it): `sysctl -w net.ipv4.conf.all.route_localnet=0` if nothing does"
        )


@cli.command()
@click.option(
    "--manifests",
    "manifests_path",
    type=click.Path(exists=True),
    help="Read Services, EndpointSlices, ServiceCIDRs and Nodes from files (re-read on change),"
    " not the API.",
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
    from kproxy.inspect.inputs import load_config_file, resolve_hostname

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
    from kproxy.inspect.inputs import load_config_file
    from kproxy.sync.modes import mode_needs

    checks = run_checks(load_config_file(config_path), service_cidr, modes=mode_needs())
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
    from kproxy.inspect.trace_cmd import TraceRequest, trace_request
    from kproxy.inspect.trace_view import render_output

    request = TraceRequest(protocol, destination, source, in_interface)
    args = (manifests_paths, node_addresses, lock_timeout, config_path, hostname)
    explanation = trace_request(request, *args)
    click.echo(render_output(explanation, output), nl=False)


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
    from kproxy.inspect.connections_cmd import show_connections

    args = (kubeconfig, endpoint, output, config_path, hostname)
    click.echo(show_connections(service, manifests_paths, *args), nl=False)


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
    from kproxy.inspect.status_cmd import show_status

    click.echo(show_status(address, output, config_path), nl=False)


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
