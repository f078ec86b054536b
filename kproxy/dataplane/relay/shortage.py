"""Sockets the relay could not open (EMFILE, ENFILE, ENOBUFS...): each costs the one connection or
datagram that needed it, is counted on its service port, and the first of a run is logged, so a
flood neither ends the relay (upstream's exited) nor floods the log."""

from __future__ import annotations

import socket

import structlog

from kproxy.dataplane.relay.spec import ServicePortCounters

log = structlog.get_logger("kproxy.dataplane")


class SocketShortage:
    """Logs the first failure, then stays quiet until a socket opens again."""

    def __init__(self) -> None:
        self._quiet = False

    def open(
        self, family: socket.AddressFamily, kind: socket.SocketKind, counters: ServicePortCounters
    ) -> socket.socket | None:
        """A non-blocking socket, or None (counted, and logged once per run) when the kernel
        refuses one."""
        try:
            sock = socket.socket(family, kind)
        except OSError as exc:
            self.failed(exc, counters)
            return None
        sock.setblocking(False)
        self._quiet = False
        return sock

    def failed(self, exc: OSError, counters: ServicePortCounters) -> None:
        counters.socket_failures += 1
        if not self._quiet:
            self._quiet = True
            log.warning(
                "relay_socket_failed",
                error=exc.strerror or str(exc),
                hint="the connection or datagram is dropped; raise the open-file limit "
                "(RLIMIT_NOFILE) if this repeats",
            )


SHORTAGE = SocketShortage()
