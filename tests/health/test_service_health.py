import json
import socket
import threading
import urllib.error
import urllib.request

import structlog.testing

from kproxy.health.service_health import ServiceHealthServers
from kproxy.model.service import NamespacedName

WEB = NamespacedName("default", "web")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(port: int) -> tuple[int, dict[str, object], str | None]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            return (
                resp.status,
                json.loads(resp.read()),
                resp.headers["X-Load-Balancing-Endpoint-Weight"],
            )
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers["X-Load-Balancing-Endpoint-Weight"]


def test_answers_200_with_local_endpoints_and_503_without() -> None:
    healthy = [True]
    servers = ServiceHealthServers(("127.0.0.1",), proxy_healthy=lambda: healthy[0])
    port = free_port()
    try:
        servers.sync_services({WEB: port})
        servers.sync_endpoints({WEB: 2})
        status, body, weight = get(port)
        assert status == 200 and weight == "2"
        assert body == {
            "service": {"namespace": "default", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": True,
        }
        servers.sync_endpoints({})
        status, body, weight = get(port)
        assert status == 503 and weight == "0" and body["localEndpoints"] == 0
        servers.sync_endpoints({WEB: 1})
        healthy[0] = False
        status, body, _ = get(port)
        assert status == 503 and body["serviceProxyHealthy"] is False
    finally:
        servers.close()


def test_removed_service_stops_listening() -> None:
    servers = ServiceHealthServers(("127.0.0.1",))
    port = free_port()
    try:
        servers.sync_services({WEB: port})
        servers.sync_services({})
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        servers.close()


def test_a_port_held_by_another_program_is_tried_again_every_sync_and_warned_once() -> None:
    servers = ServiceHealthServers(("127.0.0.1",))
    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):  # three syncs while the port is taken
                servers.sync_services({WEB: port})
                servers.sync_endpoints({WEB: 1})
            blocker.close()
            servers.sync_services({WEB: port})  # the next sync after it was freed
        status, body, weight = get(port)
        assert (status, weight, body["localEndpoints"]) == (200, "1", 1)
        events = [entry["event"] for entry in logs]
        assert events == ["health_check_listen_failed", "health_check_listening"], logs
        assert logs[0]["service"] == "default/web" and logs[0]["port"] == port
    finally:
        blocker.close()
        servers.close()


def test_one_thread_serves_every_health_check_node_port() -> None:
    before = threading.active_count()
    servers = ServiceHealthServers(("127.0.0.1",))
    ports = {NamespacedName("default", f"web-{i}"): free_port() for i in range(20)}
    try:
        servers.sync_services(ports)
        servers.sync_endpoints(dict.fromkeys(ports, 1))
        assert all(get(port)[0] == 200 for port in ports.values())
        assert threading.active_count() - before == 1
    finally:
        servers.close()
