"""Proxy ports from `portRange`: "" lets the kernel pick, else a range handed out at random."""

from __future__ import annotations

import random

from kproxy.errors import ConfigError, KproxyError


class PortsExhaustedError(KproxyError):
    """Every port of portRange is in use."""


def parse_port_range(text: str) -> tuple[int, int] | None:
    """`begin-end`, `begin+size` or one `port`, inclusive; None ("", "0", "0-0"): kernel picks.

    `begin+size` follows upstream's reading: `30000+100` is 30000..30100."""
    text = text.strip()
    if text in ("", "0", "0-0"):
        return None
    try:
        if "+" in text:
            begin_s, size_s = text.split("+", 1)
            begin, end = int(begin_s), int(begin_s) + int(size_s)
        elif "-" in text:
            begin_s, end_s = text.split("-", 1)
            begin, end = int(begin_s), int(end_s)
        else:
            begin = end = int(text)
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a port range (use begin-end or begin+size)", "portRange"
        ) from None
    if not 1 <= begin <= end <= 65535:
        raise ConfigError(f"{text!r} is not within 1-65535 with begin <= end", "portRange")
    return begin, end


class PortAllocator:
    """Ports of one range; `allocate()` returns 0 when the kernel is to pick (no range)."""

    def __init__(self, port_range: str = "", rng: random.Random | None = None) -> None:
        self._range = parse_port_range(port_range)
        self._rng = rng if rng is not None else random.Random()
        self._used: set[int] = set()

    @property
    def in_use(self) -> int:
        return len(self._used)

    def allocate(self) -> int:
        if self._range is None:
            return 0
        begin, end = self._range
        size = end - begin + 1
        if len(self._used) >= size:
            raise PortsExhaustedError(f"no remaining ports in portRange {begin}-{end}")
        # A random start, then upward with wrap: a freed port is not handed straight back.
        start = self._rng.randrange(size)
        for step in range(size):
            port = begin + (start + step) % size
            if port not in self._used:
                self._used.add(port)
                return port
        raise AssertionError("unreachable: a free port was counted")

    def release(self, port: int) -> None:
        self._used.discard(port)
