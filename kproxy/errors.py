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
    """A configuration file or flag with a value kproxy refuses."""


class DataplaneError(KproxyError):
    """The kernel tables could not be read or written."""


class TableLockedError(DataplaneError):
    """Another program held the xtables lock longer than kproxy was willing to wait."""
