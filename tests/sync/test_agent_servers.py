import socket
from contextlib import ExitStack
from typing import Any

import pytest

from kproxy.errors import ConfigError
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.sync.agent import _listen, _start_servers


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_a_busy_port_is_a_config_error_saying_what_to_do() -> None:
    sock, port = _busy_port()

    def start(address: tuple[str, int]) -> Any:
        socket.create_server(address)

    with sock, pytest.raises(ConfigError) as caught:
        _listen("metricsBindAddress", f"127.0.0.1:{port}", start)
    assert caught.value.field == "metricsBindAddress"
    message = str(caught.value)
    assert message.startswith(f"metricsBindAddress 127.0.0.1:{port}: cannot listen (")
    assert "is kube-proxy (or another kproxy) still running" in message


def test_when_metrics_cannot_listen_healthz_is_stopped_and_its_port_freed() -> None:
    sock, busy = _busy_port()
    healthz = _free_port()
    config = ProxyConfig(
        healthz_bind_address=f"127.0.0.1:{healthz}", metrics_bind_address=f"127.0.0.1:{busy}"
    )
    with sock:
        with pytest.raises(ConfigError, match="metricsBindAddress"), ExitStack() as servers:
            _start_servers(config, ProxyHealth(timeout=60.0), ProxyMetrics(), servers)
        with socket.create_server(("127.0.0.1", healthz)):
            pass  # healthz let its port go


def test_both_servers_start_and_stop() -> None:
    config = ProxyConfig(
        healthz_bind_address=f"127.0.0.1:{_free_port()}",
        metrics_bind_address=f"127.0.0.1:{_free_port()}",
    )
    with ExitStack() as servers:
        _start_servers(config, ProxyHealth(timeout=60.0), ProxyMetrics(), servers)
        for bind in (config.healthz_bind_address, config.metrics_bind_address):
            port = int(bind.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
