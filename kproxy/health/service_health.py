"""Per-service health-check servers on `healthCheckNodePort` (type LoadBalancer with
externalTrafficPolicy: Local): a cloud load balancer asks each node whether it has local
endpoints, and sends traffic only to the nodes that answer 200.

The answer is upstream's: JSON `{"service": {"namespace", "name"}, "localEndpoints": N,
"serviceProxyHealthy": bool}`, header `X-Load-Balancing-Endpoint-Weight: N`, status 200 when N > 0
and the proxy itself is healthy, else 503.

A port that cannot be bound (another program holds it) is tried again on every sync until it
binds, as upstream does, with one warning per service, port and address until then: the load
balancer would otherwise see the node as having no endpoints until the agent restarts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import structlog

from kproxy.health.http import Handler, HttpServer, Listener, Request, Response, json_response
from kproxy.model.service import NamespacedName

log = structlog.get_logger("kproxy.health")


class ServiceHealthServers:
    """One listener per service with a health-check node port and listen address, all served by
    one thread."""

    def __init__(
        self,
        listen_addresses: tuple[str, ...] = ("0.0.0.0",),
        proxy_healthy: Callable[[], bool] = lambda: True,
        on_accept_error: Callable[[str], None] = lambda error: None,
    ) -> None:
        self.listen_addresses = listen_addresses
        self.proxy_healthy = proxy_healthy
        self._server = HttpServer("health-check-node-ports", on_accept_error=on_accept_error)
        # Per service: its port, and its listener per address (None: not bound yet).
        self._wanted: dict[NamespacedName, tuple[int, dict[str, Listener | None]]] = {}
        self._warned: set[tuple[NamespacedName, int, str]] = set()
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
        """Listen on these addresses from now on; every listener restarts when they change."""
        if tuple(addresses) != tuple(self.listen_addresses):
            self._stop_all()
            self.listen_addresses = tuple(addresses)

    def sync_services(self, ports: Mapping[NamespacedName, int]) -> None:
        """Listen for new services or ports, stop those no longer wanted, and try again each
        listener that could not bind before."""
        for key in list(self._wanted):
            port, listeners = self._wanted[key]
            if ports.get(key) != port:
                self._stop(listeners)
                del self._wanted[key]
                self._warned = {w for w in self._warned if w[0] != key}
        for key, port in ports.items():
            _, listeners = self._wanted.setdefault(key, (port, {}))
            for address in self.listen_addresses:
                if listeners.get(address) is None:
                    listeners[address] = self._listen(key, port, address)

    def _listen(self, key: NamespacedName, port: int, address: str) -> Listener | None:
        try:
            listener = self._server.listen((address, port), self._answer_for(key))
        except OSError as exc:
            if (key, port, address) not in self._warned:
                self._warned.add((key, port, address))
                log.warning(
                    "health_check_listen_failed",
                    service=str(key),
                    port=port,
                    address=address,
                    error=str(exc),
                    retry="every sync",
                )
            return None
        if (key, port, address) in self._warned:
            self._warned.discard((key, port, address))
            log.info("health_check_listening", service=str(key), port=port, address=address)
        return listener

    def _answer_for(self, key: NamespacedName) -> Handler:
        def answer(request: Request) -> Response:
            count = self.local_endpoints(key)
            healthy = self.proxy_healthy()
            body = {
                "service": {"namespace": key.namespace, "name": key.name},
                "localEndpoints": count,
                "serviceProxyHealthy": healthy,
            }
            return json_response(
                200 if count > 0 and healthy else 503,
                body,
                {"X-Load-Balancing-Endpoint-Weight": str(count)},
            )

        return answer

    def _stop(self, listeners: Mapping[str, Listener | None]) -> None:
        for listener in listeners.values():
            if listener is not None:
                self._server.unlisten(listener)

    def _stop_all(self) -> None:
        for _, listeners in self._wanted.values():
            self._stop(listeners)
        self._wanted.clear()
        self._warned.clear()

    def close(self) -> None:
        self._stop_all()
        self._server.close()
