"""Prometheus metrics under kube-proxy's names, so existing dashboards and alerts keep working."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# kube-proxy's sync histograms: exponential from 1 ms, doubling, 15 buckets.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# kube-proxy's network programming histogram buckets.
PROGRAMMING_BUCKETS = (
    0.25,
    0.5,
    *range(1, 60),
    *range(60, 120, 5),
    *range(120, 301, 30),
)


class ModeMetrics:
    """What differs between modes: the rules gauges (per table) and the failure counters, under
    upstream's names for the tables the mode writes ("legacy": the iptables names; "nftables").
    kube-proxy's nftables mode has no rules gauge: kproxy's own `kproxy_sync_proxy_rules_nftables_*`
    gauges count the rules of its `kube-proxy` tables."""

    def __init__(self, r: CollectorRegistry, tables: str) -> None:
        self.partial_sync_failures: Counter | None = None
        self.cleanup_failures: Counter | None = None
        if tables == "nftables":
            self.rules_total = Gauge(
                "kproxy_sync_proxy_rules_nftables_total",
                "Total number of nftables rules owned by kproxy, over the families",
                ["table"],
                registry=r,
            )
            self.rules_last = Gauge(
                "kproxy_sync_proxy_rules_nftables_last",
                "Number of nftables rules written by kproxy in last sync",
                ["table"],
                registry=r,
            )
            self.sync_failures = Counter(
                "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                "Cumulative proxy nftables sync failures",
                registry=r,
            )
            self.cleanup_failures = Counter(
                "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
                "Cumulative proxy nftables cleanup failures",
                registry=r,
            )
            return
        self.rules_total = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            ["table"],
            registry=r,
        )
        self.rules_last = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync",
            ["table"],
            registry=r,
        )
        self.sync_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            registry=r,
        )
        self.partial_sync_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            registry=r,
        )

    def sync_failed(self, full: bool) -> None:
        self.sync_failures.inc()
        if not full and self.partial_sync_failures is not None:
            self.partial_sync_failures.inc()

    def cleanups_failed(self, count: int) -> None:
        if count and self.cleanup_failures is not None:
            self.cleanup_failures.inc(count)


class ProxyMetrics:
    """Every metric kproxy exports, in one registry (one per agent, so tests stay isolated)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._sync_metrics(self.registry)
        self._change_metrics(self.registry)
        self._node_metrics(self.registry)
        self._modes: dict[str, ModeMetrics] = {}

    def _sync_metrics(self, r: CollectorRegistry) -> None:
        """How long syncs take, when the last ran, how long a change took to reach the rules."""
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            registry=r,
        )
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            registry=r,
        )
        self.network_programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            buckets=PROGRAMMING_BUCKETS,
            registry=r,
        )

    def _change_metrics(self, r: CollectorRegistry) -> None:
        """The changes the sources reported, and the objects skipped."""
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            registry=r,
        )
        self.endpoint_changes_total = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            registry=r,
        )
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            registry=r,
        )
        self.service_changes_total = Counter(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            registry=r,
        )
        self.objects_skipped = Counter(
            "kproxy_invalid_objects_skipped",
            "Kubernetes objects skipped because a field could not be programmed",
            ["kind"],
            registry=r,
        )
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy"],
            registry=r,
        )

    def _node_metrics(self, r: CollectorRegistry) -> None:
        """Health answers, conntrack cleanup, and the agent's own troubles."""
        self.healthz = Counter(
            "kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=r
        )
        self.livez = Counter(
            "kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=r
        )
        self.conntrack_deleted = Counter(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            registry=r,
        )
        self.conntrack_duration = Histogram(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.accept_errors = Counter(
            "kproxy_http_accept_errors",
            "Connections an HTTP server could not accept (EMFILE and the like); it paused "
            "accepting briefly and dropped its oldest connection",
            ["server", "error"],
            registry=r,
        )
        self.handover_failures = Counter(
            "kproxy_userspace_handover_failures",
            "Attempts to hand the userspace mode's portals over to iptables rules at stop that "
            "failed (EMFILE, the xtables lock...); retried, then the portals are left in place",
            registry=r,
        )

    def for_mode(self, tables: str) -> ModeMetrics:
        """The metrics of a mode whose rules go into `tables` (its NodeNeeds.tables: "legacy"
        or "nftables"), registered on first use: as upstream, a mode's own metrics exist only
        while it runs (no iptables series reading 0 in the nftables mode, and the reverse)."""
        if tables not in self._modes:
            self._modes[tables] = ModeMetrics(self.registry, tables)
        return self._modes[tables]

    def accept_error_counter(self, server: str) -> Callable[[str], None]:
        """What an HTTP server calls when accept fails for want of descriptors or memory."""
        return lambda error: self.accept_errors.labels(server=server, error=error).inc()

    def watch_sources(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Export each source's failure count (its supervisor's), read at each scrape."""
        self.registry.register(SourceCollector(read))

    def watch_localhost_node_ports(
        self, read: Callable[[], Mapping[int, Mapping[str, int]]]
    ) -> None:
        """Export KEP-6032's metrics (the nftables mode with its gate on), read at each scrape."""
        self.registry.register(LocalhostNodePortCollector(read))

    def watch_relay(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Export the userspace relay's own counters, read from `read` at each scrape."""
        self.registry.register(RelayCollector(read))


# (metric, help, counter name in the relay, is a counter) per exported series.
RELAY_SERIES = (
    ("active_connections", "TCP connections being relayed now", "active_connections", False),
    ("connections", "TCP connections accepted", "connections_total", True),
    (
        "endpoint_dial_failures",
        "Dials to an endpoint that failed or timed out",
        "dial_failures",
        True,
    ),
    (
        "no_endpoint_rejects",
        "Connections reset because the service had no endpoint",
        "no_endpoint_rejects",
        True,
    ),
    ("udp_mappings", "UDP clients with a live mapping to an endpoint", "udp_mappings", False),
    (
        "udp_datagrams_dropped",
        "UDP datagrams that could not be relayed",
        "udp_datagrams_dropped",
        True,
    ),
    (
        "socket_failures",
        "Sockets the kernel refused (EMFILE and the like): each dropped one connection or datagram",
        "socket_failures",
        True,
    ),
)


class RelayCollector(Collector):
    """The relay's counters per service port, under kproxy_userspace_*."""

    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        counters = self.read()
        for name, help_text, key, is_counter in RELAY_SERIES:
            kind = CounterMetricFamily if is_counter else GaugeMetricFamily
            family = kind(f"kproxy_userspace_{name}", help_text, labels=["service_port"])
            for service_port, values in sorted(counters.items()):
                family.add_metric([service_port], values.get(key, 0))
            yield family
        relayed = CounterMetricFamily(
            "kproxy_userspace_bytes",
            "Bytes relayed, by direction",
            labels=["service_port", "direction"],
        )
        for service_port, values in sorted(counters.items()):
            relayed.add_metric([service_port, "to_endpoint"], values.get("bytes_to_endpoint", 0))
            relayed.add_metric([service_port, "to_client"], values.get("bytes_to_client", 0))
        yield relayed
        refused = CounterMetricFamily(
            "kproxy_userspace_connections_refused",
            "TCP connections reset and UDP datagrams dropped at the relay's caps on concurrent "
            "connections (service_cap: the service port's, total_cap: the relay's)",
            labels=["service_port", "reason"],
        )
        for service_port, values in sorted(counters.items()):
            for reason in ("service_cap", "total_cap"):
                refused.add_metric([service_port, reason], values.get(f"refused_{reason}", 0))
        yield refused


IP_FAMILY = {4: "IPv4", 6: "IPv6"}  # upstream's ip_family label values


class LocalhostNodePortCollector(Collector):
    """KEP-6032's series under upstream's names, per family. Upstream's rejected-packets counter
    counts localhost packets to UDP and SCTP NodePorts that an nftables rule rejects (its relay
    serves TCP only); kproxy's counts the TCP connections its relay resets on a localhost
    NodePort for want of an endpoint the traffic policy allows (`protocol="TCP"`). UDP and SCTP
    localhost NodePorts get the kernel's port unreachable and are not counted (docs)."""

    def __init__(self, read: Callable[[], Mapping[int, Mapping[str, int]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        counts = sorted(self.read().items())
        listeners = GaugeMetricFamily(
            "kubeproxy_nftables_localhost_nodeport_listeners",
            "Number of localhost NodePort userspace proxy listeners",
            labels=["ip_family"],
        )
        failures = CounterMetricFamily(
            "kubeproxy_nftables_localhost_nodeport_listener_creation_failures",
            "Number of localhost NodePort userspace proxy listener creation failures",
            labels=["ip_family"],
        )
        rejected = CounterMetricFamily(
            "kubeproxy_nftables_localhost_nodeport_rejected_packets",
            "Number of connections to localhost NodePorts rejected (reset) for want of an "
            "endpoint the NodePort's externalTrafficPolicy allows",
            labels=["ip_family", "protocol"],
        )
        for family, values in counts:
            label = IP_FAMILY.get(family, str(family))
            listeners.add_metric([label], values.get("listeners", 0))
            failures.add_metric([label], values.get("creation_failures", 0))
            rejected.add_metric([label, "TCP"], values.get("rejected", 0))
        yield listeners
        yield failures
        yield rejected


class SourceCollector(Collector):
    """Failures of each source thread (a list or watch, a scan of the manifests), all retried."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "kproxy_source_failures",
            "Failures of a source (API list/watch, manifest scan: EMFILE, the API server "
            "away...); each is retried after a backoff, and a run of the same one is logged once",
            labels=["source"],
        )
        for source, failures in sorted(self.read().items()):
            family.add_metric([source], failures)
        yield family
