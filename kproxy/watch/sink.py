"""What a source of Kubernetes objects reports into: state changes, and when a kind is listed."""

from __future__ import annotations

from typing import Protocol

from kproxy.state.ingest import Mutation

SERVICE = "Service"
ENDPOINT_SLICE = "EndpointSlice"
NODE = "Node"


class Sink(Protocol):
    def apply(self, kind: str, mutation: Mutation) -> None:
        """Apply a change of `kind` to the cluster state (under the sink's lock)."""

    def synced(self, kind: str) -> None:
        """Every object of `kind` has been listed once."""
