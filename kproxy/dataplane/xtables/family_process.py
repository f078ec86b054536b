"""Run one address family's python-iptables backend in a process of its own.

libxtables keeps one registry of extensions per process. iptables 1.8.9 ships the NAT targets
(DNAT, SNAT, MASQUERADE, ...) in one extension (libxt_NAT) whose init registers the revisions of
the family that is current when it first loads, plus family-independent (AF_UNSPEC) revisions.
python-iptables cannot re-run that init for the other family: it looks for `libxt_DNAT_init`,
which does not exist, and running `libxt_NAT_init` again would register the AF_UNSPEC revisions
twice, which libxtables answers with exit(1). So the second family gets "can't find target DNAT".
A freshly spawned process per family starts with an empty registry; IPv4 runs in the main process.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from multiprocessing.connection import Connection
from typing import Any

from kproxy.dataplane.base import ApplyResult
from kproxy.dataplane.xtables.lock import LOCK_TIMEOUT
from kproxy.errors import DataplaneError, KproxyError
from kproxy.rules.ir import Ruleset
from kproxy.rules.saved import SavedTable


def _serve(conn: Connection, family: int, lock_timeout: float, keep_copies: bool) -> None:
    # The child serves its parent until the parent closes the pipe. A SIGTERM or Ctrl-C sent to
    # the whole process group is the parent's to act on: it may still have rules to write as it
    # stops (the userspace mode's hand-over).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve_requests(conn, family, lock_timeout, keep_copies)
    except (BrokenPipeError, EOFError, KeyboardInterrupt):
        return  # the parent went away: nothing left to serve


def _serve_requests(conn: Connection, family: int, lock_timeout: float, keep_copies: bool) -> None:
    from kproxy.dataplane.xtables.backend import IptablesDataplane

    try:
        dataplane = IptablesDataplane(family, lock_timeout, keep_copies)
    except KproxyError as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", None))
    handlers: dict[str, Callable[[Any], object]] = {
        "apply": lambda arg: dataplane.apply(*arg),
        "cleanup": lambda _: dataplane.cleanup(),
        "read": lambda _: dataplane.read(),
    }
    try:
        while True:
            request, arg = conn.recv()
            handler = handlers.get(request)
            if handler is None:
                return
            try:
                conn.send(("ok", handler(arg)))
            except KproxyError as exc:
                conn.send(("error", str(exc)))
    finally:
        dataplane.close()


class FamilyProcess:
    """The Dataplane protocol, served by IptablesDataplane in a spawned child process."""

    def __init__(
        self, family: int, lock_timeout: float = LOCK_TIMEOUT, keep_copies: bool = True
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, family, lock_timeout, keep_copies), daemon=True
        )
        self._process.start()
        child.close()
        self._started = False  # the child loads python-iptables while the caller goes on

    def _ensure_started(self) -> None:
        if not self._started:
            self._call_reply(self._receive())
            self._started = True

    def _receive(self) -> tuple[str, Any]:
        try:
            reply: tuple[str, Any] = self._conn.recv()
        except EOFError:
            raise DataplaneError("the IPv6 dataplane process exited unexpectedly") from None
        return reply

    @staticmethod
    def _call_reply(reply: tuple[str, Any]) -> Any:
        status, value = reply
        if status == "error":
            raise DataplaneError(value)
        return value

    def _call(self, request: str, arg: Any = None) -> Any:
        self._ensure_started()
        try:
            self._conn.send((request, arg))
        except OSError:
            raise DataplaneError("the IPv6 dataplane process exited unexpectedly") from None
        return self._call_reply(self._receive())

    def read(self) -> dict[str, SavedTable]:
        tables: dict[str, SavedTable] = self._call("read")
        return tables

    def apply(self, ruleset: Ruleset, full: bool = True) -> ApplyResult:
        result: ApplyResult = self._call("apply", (ruleset, full))
        return result

    def reading_ahead(self) -> AbstractContextManager[None]:
        return nullcontext()

    def cleanup(self) -> ApplyResult:
        result: ApplyResult = self._call("cleanup")
        return result

    def close(self) -> None:
        self._conn.close()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
