"""Typed errors. Each says what went wrong, about which object, and what to do."""

from __future__ import annotations


class KproxyError(Exception):
    """Base of every error kproxy raises on purpose; the CLI prints it and exits non-zero."""


class InvalidObjectError(KproxyError):
    """A Kubernetes object that cannot be programmed: names the object and the field."""

    def __init__(self, obj: str, field: str, problem: str) -> None:
        super().__init__(f"{obj}: field {field}: {problem}")
        self.obj = obj
        self.field = field
        self.problem = problem


class ManifestError(KproxyError):
    """A manifest file that cannot be read or parsed at all."""


class ConfigError(KproxyError):
    """A configuration file or flag with a value kproxy refuses.

    `field` is the KubeProxyConfiguration path (`iptables.masqueradeBit`) when the problem is one
    field's value, else None; `where` is what the message starts with (by default the field), so
    a value that came from a flag can be reported under the flag's name."""

    def __init__(self, problem: str, field: str | None = None, *, where: str | None = None) -> None:
        if where is None:
            where = f"config field {field}" if field else "config"
        super().__init__(f"{where}: {problem}")
        self.problem = problem
        self.field = field
        self.where = where


class DataplaneError(KproxyError):
    """The kernel tables could not be read or written."""


class TableLockedError(DataplaneError):
    """Another program held the xtables lock longer than kproxy was willing to wait."""


def at_line(line: int | None, problem: str) -> str:
    """`line 9: problem` (1-based), or `?: problem` when the parser did not say where."""
    return f"{f'line {line}' if line else '?'}: {problem}"


def describe_yaml_error(exc: Exception) -> tuple[int | None, str]:
    """The 1-based line and a one-line `invalid YAML (...)` for a PyYAML error. PyYAML's own
    text is several lines naming `"<unicode string>"`; its marks say the same, shorter. Duck-typed
    so that this module needs no YAML import."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    line = mark.line + 1 if mark is not None else None
    return line, f"invalid YAML ({problem})"
