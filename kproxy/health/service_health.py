"""Per-service health-check servers on `healthCheckNodePort` (type LoadBalancer with
externalTrafficPolicy: Local): a cloud load balancer asks each node whether it has local
endpoints, and sends traffic only to the nodes that answer 200.

The answer is upstream's: JSON `{"service": {"namespace", "name"}, "localEndpoints": N,
"serviceProxyHealthy": bool}`, header `X-Load-Balancing-Endpoint-Weight: N`, status 200 when N > 0
and the proxy itself is healthy, else 503.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import structlog

from kproxy.health.http import JsonHandler, QuietServer
from kproxy.model.service import NamespacedName

log = structlog.get_logger("kproxy.health")


class _ServiceServer(QuietServer):
    def __init__(self, address: tuple[str, int], owner: ServiceHealthServers, key: NamespacedName):
        self.owner = owner
        self.key = key
        super().__init__(address, _Handler)


class _Handler(JsonHandler):
    server: _ServiceServer

    def do_GET(self) -> None:
        key = self.server.key
        count = self.server.owner.local_endpoints(key)
        healthy = self.server.owner.proxy_healthy()
        body = {
            "service": {"namespace": key.namespace, "name": key.name},
            "localEndpoints": count,
            "serviceProxyHealthy": healthy,
        }
        self.send_json(
            200 if count > 0 and healthy else 503,
            body,
            {"X-Load-Balancing-Endpoint-Weight": str(count)},
        )


class ServiceHealthServers:
    """One HTTP server per service with a health-check node port, on each listen address."""

    def __init__(
        self,
        listen_addresses: tuple[str, ...] = ("0.0.0.0",),
        proxy_healthy: Callable[[], bool] = lambda: True,
    ) -> None:
        self.listen_addresses = listen_addresses
        self.proxy_healthy = proxy_healthy
        self._servers: dict[NamespacedName, tuple[int, list[_ServiceServer]]] = {}
        self._endpoints: dict[NamespacedName, int] = {}
        self._lock = threading.Lock()

    def local_endpoints(self, key: NamespacedName) -> int:
        with self._lock:
            return self._endpoints.get(key, 0)

    def sync_endpoints(self, counts: Mapping[NamespacedName, int]) -> None:
        """Local ready endpoint counts per service."""
        with self._lock:
            self._endpoints = dict(counts)

    def sync_addresses(self, addresses: tuple[str, ...]) -> None:
        """Listen on these addresses from now on; every server restarts when they change."""
        if tuple(addresses) != tuple(self.listen_addresses):
            self.close()
            self.listen_addresses = tuple(addresses)

    def sync_services(self, ports: Mapping[NamespacedName, int]) -> None:
        """Start servers for new services or ports, stop those no longer wanted."""
        for key in list(self._servers):
            port, servers = self._servers[key]
            if ports.get(key) != port:
                self._stop(servers)
                del self._servers[key]
        for key, port in ports.items():
            if key not in self._servers:
                self._servers[key] = (port, self._start(key, port))

    def _start(self, key: NamespacedName, port: int) -> list[_ServiceServer]:
        servers = []
        for address in self.listen_addresses:
            try:
                server = _ServiceServer((address, port), self, key)
            except OSError as exc:
                log.warning(
                    "health_check_listen_failed", service=str(key), port=port, error=str(exc)
                )
                continue
            server.start(f"health-{key}")
            servers.append(server)
        return servers

    @staticmethod
    def _stop(servers: list[_ServiceServer]) -> None:
        for server in servers:
            server.shutdown()
            server.server_close()

    def close(self) -> None:
        for _, servers in self._servers.values():
            self._stop(servers)
        self._servers.clear()
