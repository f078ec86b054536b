"""Endpoint choice for one service port: round robin, reshuffled on change, ClientIP affinity.

The caller passes the endpoints the shared selection (plan/endpoints.py) chose; this module only
orders them. It is used from the relay's event loop thread only, so it holds no lock."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kproxy.errors import KproxyError

EndpointAddr = tuple[str, int]


class NoEndpointsError(KproxyError):
    """The service port has no endpoint to send a connection or datagram to."""


@dataclass
class _Affinity:
    endpoint: EndpointAddr
    last_used: float


class LoadBalancerRR:
    """Round robin over one service port's endpoints, as upstream's userspace balancer does.

    `affinity_seconds` None means no affinity; the caller resolves Kubernetes' "0 means 3 h"
    before it gets here (ServicePort.session_affinity_seconds already holds the resolved TTL)."""

    def __init__(
        self,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._endpoints: list[EndpointAddr] = []
        self._index = 0
        self._affinity_seconds: int | None = None
        self._affinity: dict[str, _Affinity] = {}

    @property
    def endpoints(self) -> list[EndpointAddr]:
        """The current order (a copy)."""
        return list(self._endpoints)

    def set_endpoints(
        self, endpoints: Sequence[EndpointAddr], affinity_seconds: int | None = None
    ) -> bool:
        """Take a new endpoint set; returns whether it differed (as a set) from the last one.

        An unchanged set keeps its order and position so that a resync does not disturb the
        rotation; a changed one is reshuffled so that every agent does not start on the same pod."""
        if affinity_seconds != self._affinity_seconds:
            self._affinity_seconds = affinity_seconds
            self._affinity.clear()
        wanted = set(endpoints)
        if wanted == set(self._endpoints):
            return False
        shuffled = sorted(wanted)
        self._rng.shuffle(shuffled)
        self._endpoints = shuffled
        self._index = 0
        # Records pointing at a removed endpoint would send clients to nothing.
        for client, record in list(self._affinity.items()):
            if record.endpoint not in wanted:
                del self._affinity[client]
        return True

    def next_endpoint(self, client_ip: str, reset: bool = False) -> EndpointAddr:
        """The endpoint for this client; `reset` (a retry after a failed dial) skips affinity."""
        if not self._endpoints:
            raise NoEndpointsError("service port has no endpoints")
        now = self._clock()
        ttl = self._affinity_seconds
        if ttl is not None and not reset:
            record = self._affinity.get(client_ip)
            # Whole elapsed seconds, as upstream compares them.
            if record is not None and int(now - record.last_used) < ttl:
                record.last_used = now
                return record.endpoint
        endpoint = self._endpoints[self._index]
        self._index = (self._index + 1) % len(self._endpoints)
        if ttl is not None:
            self._affinity[client_ip] = _Affinity(endpoint, now)
        return endpoint

    def sweep_affinity(self) -> int:
        """Drop expired affinity records; returns how many went."""
        ttl = self._affinity_seconds
        if ttl is None:
            return 0
        now = self._clock()
        stale = [c for c, r in self._affinity.items() if int(now - r.last_used) >= ttl]
        for client in stale:
            del self._affinity[client]
        return len(stale)
