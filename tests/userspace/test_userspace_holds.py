"""Port holding on loopback: a held port cannot be bound by another program until released."""

from __future__ import annotations

import errno
import socket

import pytest

from kproxy.dataplane.userspace.holds import HeldPort, PortHolds
from kproxy.model.service import Protocol


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_bind(kind: int, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return False
        return True


@pytest.mark.parametrize(
    ("protocol", "kind"),
    [(Protocol.TCP, socket.SOCK_STREAM), (Protocol.UDP, socket.SOCK_DGRAM)],
)
def test_a_held_port_is_reserved_until_it_is_released(protocol: Protocol, kind: int) -> None:
    port = free_port(kind)
    holds = PortHolds()
    try:
        assert holds.sync([HeldPort(protocol, 4, "127.0.0.1", port)]) == {}
        assert not can_bind(kind, port)
        holds.sync([])
        assert can_bind(kind, port)
    finally:
        holds.close()


def test_a_port_in_use_is_reported_and_the_others_are_held() -> None:
    taken, free = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    holds = PortHolds()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", taken))
        try:
            wanted = [HeldPort(Protocol.UDP, 4, "127.0.0.1", p) for p in (taken, free)]
            errors = holds.sync(wanted)
            assert list(errors) == [wanted[0]] and "in use" in errors[wanted[0]]
            assert holds.held == {wanted[1]}
            assert str(wanted[0]) == f"127.0.0.1:{taken}/UDP"
        finally:
            holds.close()
