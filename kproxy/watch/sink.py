"""What a source of Kubernetes objects reports into: state changes, and when a kind is listed."""

from __future__ import annotations

from typing import Protocol

from kproxy.model.kinds import Kind
from kproxy.state.ingest import Mutation


class Sink(Protocol):
    def apply(self, mutation: Mutation) -> None:
        """Apply a change to the cluster state (under the sink's lock); the mutation names the
        kinds it changes."""

    def synced(self, kind: Kind) -> None:
        """Every object of `kind` has been listed once."""
