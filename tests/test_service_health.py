import json
import socket
import urllib.error
import urllib.request

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
