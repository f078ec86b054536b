"""`kproxy run`: the long-running agent. It wires a source (API watches or manifest files), the
state box, the sync loop, the dataplanes, conntrack cleanup and the health/metrics servers, and
runs until SIGTERM/SIGINT. Stopping leaves working rules in place: traffic must not stop because
the agent is restarting or being upgraded (the userspace mode, whose relay stops with the
process, first hands its portals over to the iptables mode's rules: sync/handover.py).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from types import FrameType
from typing import TypeVar

import structlog

from kproxy.dataplane.base import RelayStats
from kproxy.dataplane.conntrack import ConntrackCleaner
from kproxy.dataplane.host import tune_node, with_host_facts
from kproxy.dataplane.localhost_nodeports import LocalhostNodePortStats
from kproxy.errors import ConfigError
from kproxy.health.healthz import ProxyHealth, serve_health
from kproxy.health.http import HttpServer
from kproxy.health.metrics import ProxyMetrics
from kproxy.health.metrics_server import serve_metrics
from kproxy.health.service_health import ServiceHealthServers
from kproxy.model.addresses import build_allow_list
from kproxy.model.config import ProxyConfig, parse_bind_address
from kproxy.sync.loop import StateBox, SyncLoop
from kproxy.sync.modes import other_modes_leftovers, proxy_mode
from kproxy.sync.status import SyncStatus
from kproxy.watch.sink import Sink
from kproxy.watch.supervisor import Supervisor, source_problems

log = structlog.get_logger("kproxy")

# Starts a source's supervised threads, reporting into the sink until the event is set.
SourceStarter = Callable[[Sink, threading.Event], Sequence[Supervisor]]


def _stop_on_signals(stop: threading.Event, wake: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("agent_stopping", signal=signal.Signals(signum).name)
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


T = TypeVar("T")


def _listen(field: str, value: str, start: Callable[[tuple[str, int]], T]) -> T:
    """Start a server, turning a busy port into an error that says what to do."""
    address = parse_bind_address(value, field)
    try:
        return start(address)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen ({exc.strerror}); is kube-proxy (or another kproxy) still running on "
            "this node? Stop it, or choose another address in the config",
            field,
            where=f"{field} {value}",
        ) from exc


def _stop(server: HttpServer) -> None:
    server.close()  # frees the port at once, for a restart in the same process


def _start_servers(
    config: ProxyConfig, health: ProxyHealth, metrics: ProxyMetrics, servers: ExitStack
) -> None:
    """/healthz and /livez; /metrics and /statusz: each stopped when `servers` closes (also
    when the next fails)."""
    healthz = _listen(
        "healthzBindAddress",
        config.healthz_bind_address,
        lambda address: serve_health(address, health, metrics),
    )
    servers.callback(_stop, healthz)
    metrics_server = _listen(
        "metricsBindAddress",
        config.metrics_bind_address,
        lambda address: serve_metrics(address, health, metrics),
    )
    servers.callback(_stop, metrics_server)


def run_agent(
    config: ProxyConfig, node_name: str, start_source: SourceStarter, lock_timeout: float
) -> None:
    stop = threading.Event()
    metrics = ProxyMetrics()
    mode = proxy_mode(config)
    with mode.open_dataplane(config, lock_timeout) as dataplane, ExitStack() as servers:
        families = dataplane.families
        health = ProxyHealth(timeout=2 * config.sync_period, families=families)
        health.queued()  # nothing is programmed yet: the first sync is owed
        tune_node(config)
        _start_servers(config, health, metrics, servers)
        # Its addresses come with each plan (they depend on the Node and nodePortAddresses).
        service_health = ServiceHealthServers(
            (),
            proxy_healthy=lambda: health.status()[0],
            on_accept_error=metrics.accept_error_counter("healthCheckNodePort"),
        )
        servers.callback(service_health.close)
        box = StateBox(node_name, health, metrics)
        box.state.allowed_vips = build_allow_list(config.allowed_external_ip_cidrs)
        box.status = status = SyncStatus(mode.name, families)
        status.iptables_backend = getattr(dataplane, "backend", None)
        health.statusz = lambda body: status.body(body, health.timeout)
        _stop_on_signals(stop, box.changed)
        loop = SyncLoop(
            box=box,
            config=config,
            mode=mode,
            dataplane=dataplane,
            metrics=metrics,
            health=health,
            host_facts=with_host_facts,
            clean_conntrack=ConntrackCleaner(),
            service_health=service_health,
            status=status,
            leftovers=other_modes_leftovers(mode, lock_timeout),
        )
        log.info(
            "agent_started",
            node=node_name,
            families=list(families),
            healthz=config.healthz_bind_address,
            metrics=config.metrics_bind_address,
        )
        sources = start_source(box, stop)
        # A source is stale after the health timeout (each may allow itself longer: an idle
        # API watch); health then fails, as it does for a sync owed too long.
        health.source_problems = source_problems(sources, health.timeout)
        metrics.watch_sources(lambda: {s.source: s.failures for s in sources})
        status.sources = sources
        health.dataplane_problems = dataplane.problems
        if isinstance(dataplane, RelayStats):
            metrics.watch_relay(dataplane.service_port_counters)
        if isinstance(dataplane, LocalhostNodePortStats):
            metrics.watch_localhost_node_ports(dataplane.localhost_node_port_counts)
        loop.run(stop)
        mode.on_stop(loop)
    log.info("agent_stopped", mode=mode.name)
