"""Endpoints of a service port, read from EndpointSlices."""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.model.addresses import ip_family


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address:port backing a service port, with the slice's conditions."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone_hints: tuple[str, ...] = ()
    node_hints: tuple[str, ...] = ()

    def at_port(self, port: int) -> Endpoint:
        """This endpoint on `port` (a slice lists its endpoints once for all its ports). The
        constructor with every field, at a fifth of dataclasses.replace's cost: it runs once
        per endpoint and port of the cluster."""
        return Endpoint(
            self.ip,
            port,
            self.ready,
            self.serving,
            self.terminating,
            self.node_name,
            self.zone_hints,
            self.node_hints,
        )

    def __str__(self) -> str:
        """`ip:port`, `[ip]:port` for IPv6, as Go's net.JoinHostPort writes it."""
        return f"[{self.ip}]:{self.port}" if self.family == 6 else f"{self.ip}:{self.port}"

    @property
    def family(self) -> int:
        return ip_family(self.ip)
