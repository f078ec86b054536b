"""Typed reads of Kubernetes object fields, and the name rules the API server applies.

Objects arrive as whatever JSON or YAML held. Every read checks the value's type and, when it is
wrong, raises InvalidObjectError naming the object and the field path (`spec.ports[1].name`), so a
malformed object is skipped with one warning instead of raising something else further down.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from kproxy.errors import InvalidObjectError

# The API server's name rules (apimachinery's validation), ASCII only: a name that passes can go
# into a rule comment and a chain-name hash as it is.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# The same, as one pattern: labels of at most 63 characters joined by dots.
_DNS1123_SUBDOMAIN = re.compile(
    r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)*"
)
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_SHOW_LIMIT = 60


def show(value: Any) -> str:
    """A value for a message: ASCII only (control characters and lone surrogates escaped) and
    short, so a warning about a bad value can always be printed and logged."""
    text = ascii(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1123_LABEL.fullmatch(value) is not None


def is_dns1035_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1035_LABEL.fullmatch(value) is not None


def is_dns1123_subdomain(value: str) -> bool:
    """DNS-1123 labels joined by dots, 253 characters at most."""
    return len(value) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(value) is not None


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and _LABEL_VALUE.fullmatch(value) is not None


class FieldReader:
    """Reads fields of one object; `ref` names the object in every error (given as a function,
    it is made only when an error needs it). `skipped` collects the values left out of an
    object that is kept (the caller warns once about each)."""

    def __init__(self, ref: str | Callable[[], str]) -> None:
        self._ref = ref
        self.skipped: list[InvalidObjectError] = []

    @property
    def ref(self) -> str:
        if not isinstance(self._ref, str):
            self._ref = self._ref()
        return self._ref

    def fail(self, path: str, problem: str) -> InvalidObjectError:
        return InvalidObjectError(self.ref, path, problem)

    def ignore(self, exc: InvalidObjectError, what: str) -> None:
        """Record `exc` about one value that is left out, the rest of the object being kept."""
        self.skipped.append(InvalidObjectError(exc.obj, exc.field, f"{exc.problem}; {what}"))

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        """A mapping; absent (None) reads as empty."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be a mapping, not {show(value)}")
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        """A list; absent (None) reads as empty."""
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise self.fail(path, f"must be a list, not {show(value)}")
        return list(value)

    def string(self, value: Any, path: str, default: str = "") -> str:
        """A string; absent (None) reads as `default`."""
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, not {show(value)}")
        return value

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        """A boolean, strictly: `"false"` and `0` are not booleans."""
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, not {show(value)}")
        return value

    def integer(
        self, value: Any, path: str, low: int, high: int, default: int | None = None
    ) -> int:
        """An integer in low..high; absent reads as `default` when one is given."""
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, not {show(value)}")
        if not low <= value <= high:
            raise self.fail(path, f"{value} is out of range {low}-{high}")
        return value

    def choice(self, value: Any, path: str, allowed: tuple[str, ...]) -> str:
        """One of `allowed`; absent or empty reads as the first."""
        text = self.string(value, path) or allowed[0]
        if text not in allowed:
            raise self.fail(path, f"{show(text)} is not one of {', '.join(allowed)}")
        return text

    def port_name(self, port: Mapping[str, Any], path: str) -> str:
        """A port's optional `name` (a Service's or an EndpointSlice's): a DNS-1123 label."""
        name = self.string(port.get("name"), path + ".name")
        if name and not is_dns1123_label(name):
            raise self.fail(path + ".name", f"{show(name)} is not a valid DNS-1123 label")
        return name

    def labels(self, value: Any, path: str) -> dict[str, str]:
        """A string-to-string mapping (labels, annotations)."""
        result = {}
        for key, item in self.mapping(value, path).items():
            if not isinstance(key, str):
                raise self.fail(path, f"key {show(key)} is not a string")
            result[key] = self.string(item, f"{path}[{show(key)}]")
        return result
