"""The metrics address (metricsBindAddress, default 127.0.0.1:10249): Prometheus `/metrics`, and
kproxy's own read-only `/statusz` (what `kproxy status` shows; see docs/debugging.md).

`/statusz` names skipped objects of every namespace, the sources' errors and the API server's
address, so it is served here, on loopback by default as upstream serves `/configz`, and never on
healthzBindAddress, which every host that reaches the node may ask.
"""

from __future__ import annotations

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from kproxy.health.healthz import ProxyHealth
from kproxy.health.http import HttpServer, Request, Response, json_response
from kproxy.health.metrics import ProxyMetrics


def serve_metrics(
    address: tuple[str, int], health: ProxyHealth, metrics: ProxyMetrics
) -> HttpServer:
    """Start the /metrics and /statusz server."""

    def answer(request: Request) -> Response:
        if request.path == "/metrics":
            return Response(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
        if request.path == "/statusz":
            return json_response(200, health.statusz(health.status()[1]))
        return Response(404)

    return HttpServer.serving("metrics", address, answer, metrics.accept_error_counter("metrics"))
