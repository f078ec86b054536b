"""structlog set-up: JSON lines when stderr is not a terminal, key=value when it is.

Logs always go to stderr: python-iptables briefly redirects fd 1 while reading rules, and stdout
carries `kproxy dump` output."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from structlog.typing import Processor

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str = "info", json_lines: bool | None = None) -> None:
    import structlog  # here: `kproxy --help`, which logs nothing, starts without it

    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
