"""One supervised thread per source (the file watcher, each API reflector): whatever the source's
body raises is logged, naming the object it was handling, and the body runs again after a capped,
jittered backoff. The thread ends only when `stop` is set.

The supervisor also remembers when its source last showed that it is current (a poll of the
files, a list, a watch event or bookmark): health reads that through `problem()`, so a source that
is alive but stuck, or a thread that ended anyway, fails `/livez` instead of going unnoticed.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger("kproxy.watch")

# Object addresses in messages (urllib3 names its connection object): no part of the failure.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class Backoff:
    """Capped exponential backoff with jitter."""

    initial: float = 0.5
    cap: float = 30.0
    current: float = 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.initial)
        return self.current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.current = 0.0


class Supervisor:
    """Runs `body(self)` in a thread until `stop` is set, again after every return or exception.

    A body returns when its work ended normally (a watch stream closed: list and watch again at
    once) and raises when it failed (wait, then retry). It calls `current()` whenever its source
    proved to be up to date, and sets `handling` to the object it is working on, for the log.
    Exceptions of the `transient` types are expected trouble (the API server away, the manifest
    directory missing, EMFILE): a warning `transient_event`; anything else is an error
    `source_failed` with its traceback. A run of the same failure is logged once (every one is
    counted in `failures`); the source being current again ends the run (`source_recovered`).
    """

    def __init__(
        self,
        source: str,
        body: Callable[[Supervisor], None],
        stop: threading.Event,
        *,
        backoff: Backoff | None = None,
        transient: tuple[type[Exception], ...] = (),
        transient_event: str = "source_failed",
        min_silence: float = 0.0,
        context: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.body = body
        self.stop = stop
        self.backoff = backoff or Backoff()
        self.transient = transient
        self.transient_event = transient_event
        # How long this source may legitimately stay silent (an idle watch); health allows the
        # larger of this and its own timeout.
        self.min_silence = min_silence
        self.context = dict(context or {})  # bound to every log event (kind=, path=)
        self.clock = clock
        self.handling: str | None = None
        self.failures = 0
        self.runs = 0  # calls of `body`: every one after the first is a reconnect or retry
        self.last_error = ""
        self._quiet_failures = 0  # failures not logged since the run's first
        self._last_current = clock()
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self.run, daemon=True, name=self.source)
        self._thread.start()
        return self

    def current(self) -> None:
        """The source is up to date with what it reads from."""
        self._last_current = self.clock()
        if self.last_error:
            log.info(
                "source_recovered",
                source=self.source,
                **self.context,
                error=self.last_error,
                repeated=self._quiet_failures,
            )
            self.last_error = ""
            self._quiet_failures = 0
        self.backoff.reset()

    def run(self) -> None:
        while not self.stop.is_set():
            self.runs += 1
            try:
                self.body(self)
            except Exception as exc:  # a source thread never ends on an error: log, back off
                self._failed(exc)
            finally:
                self.handling = None

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        error = _describe(exc)
        delay = self.backoff.next()
        same = bool(self.last_error) and _ADDRESS.sub("", error) == _ADDRESS.sub(
            "", self.last_error
        )
        self.last_error = error
        if same:  # the same failure again, the source not current since: counted, not logged
            self._quiet_failures += 1
            self.stop.wait(delay)
            return
        fields: dict[str, object] = {"source": self.source, **self.context}
        fields.update(error=self.last_error, retry_in=round(delay, 2))
        if self.handling is not None:
            fields["object"] = self.handling
        if isinstance(exc, self.transient):
            log.warning(self.transient_event, **fields)
        else:
            log.error("source_failed", exc_info=exc, **fields)
        self.stop.wait(delay)

    def seconds_since_current(self) -> float:
        return self.clock() - self._last_current

    def problem(self, timeout: float) -> str | None:
        """Why this source cannot be trusted to be current, or None: its thread ended, or it has
        not been current for longer than `timeout` (or its own `min_silence`, if longer)."""
        if self._thread is not None and not self._thread.is_alive() and not self.stop.is_set():
            return f"source {self.source}: thread ended"
        silent = self.clock() - self._last_current
        if silent <= max(timeout, self.min_silence):
            return None
        why = f"source {self.source}: not current for {silent:.0f} s"
        return f"{why} ({self.last_error})" if self.last_error else why


def _describe(exc: Exception) -> str:
    """`Type: message`, even for an exception whose str() fails (the thread must not end)."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # any failure of a foreign __str__
        return f"{type(exc).__name__}: (no message)"


def source_problems(supervisors: Sequence[Supervisor], timeout: float) -> Callable[[], list[str]]:
    """For health: the problems of these sources, each time it is asked."""

    def problems() -> list[str]:
        found = (s.problem(timeout) for s in supervisors)
        return [p for p in found if p is not None]

    return problems
