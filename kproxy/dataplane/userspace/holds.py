"""Ports held for the portals: a socket bound (never listened on or read) on each NodePort, and on
each portal port of one of the node's own addresses, so that no other program on the node binds a
port the portal rules answer on, as upstream's userspace mode held them."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from typing import NamedTuple

from kproxy.model.service import Protocol

WILDCARD = {4: "0.0.0.0", 6: "::"}


class HeldPort(NamedTuple):
    protocol: Protocol
    family: int
    address: str  # "" means every address of the family
    port: int

    def __str__(self) -> str:
        host = self.address or WILDCARD[self.family]
        host = f"[{host}]" if self.family == 6 else host
        return f"{host}:{self.port}/{self.protocol.value}"


class PortHolds:
    """The held sockets; `sync(wanted)` opens what is new and closes what went."""

    def __init__(self) -> None:
        self._sockets: dict[HeldPort, socket.socket] = {}

    @property
    def held(self) -> frozenset[HeldPort]:
        return frozenset(self._sockets)

    def sync(self, wanted: Iterable[HeldPort]) -> dict[HeldPort, str]:
        """Hold exactly `wanted`; returns why each port that could not be held was not (in use
        by another program, usually): the portal still works, the port is only not reserved."""
        wanted = set(wanted)
        for held in [h for h in self._sockets if h not in wanted]:
            self._sockets.pop(held).close()
        errors = {}
        for held in sorted(wanted - set(self._sockets), key=str):
            try:
                self._sockets[held] = _bind(held)
            except OSError as exc:
                errors[held] = exc.strerror or str(exc)
        return errors

    def close(self) -> None:
        self.sync(())


def _bind(held: HeldPort) -> socket.socket:
    kind = socket.SOCK_STREAM if held.protocol is Protocol.TCP else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET6 if held.family == 6 else socket.AF_INET, kind)
    try:
        if held.family == 6:
            with contextlib.suppress(OSError):  # the v4 NodePort is held by the v4 socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((held.address or WILDCARD[held.family], held.port))
    except BaseException:
        sock.close()
        raise
    return sock
