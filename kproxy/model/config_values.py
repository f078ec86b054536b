"""Parsers of KubeProxyConfiguration values. Each takes the raw value and the field's path (for
the error) and returns the value kproxy keeps, or raises ConfigError naming the field."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any

from kproxy.errors import ConfigError

# (raw value, the field's path) -> the value kept.
Parser = Callable[[Any, str], Any]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# strconv.ParseBool's forms, which kube-proxy's boolean flags accept; nothing else.
GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def parse_duration(value: Any, field: str) -> float:
    """A Go duration string (`30s`, `1m0s`, `500ms`) in seconds; negative ones are refused."""
    text = str(value).strip()
    sign, body = (text[0], text[1:]) if text[:1] in ("-", "+") else ("", text)
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ConfigError(f"{value!r} is not a duration such as 30s or 1m0s", field)
    if sign == "-" and total:
        raise ConfigError(f"{value!r} is negative; give 0s or more", field)
    return total


def parse_go_bool(text: str) -> bool | None:
    """True or False for one of Go's boolean forms, None for anything else."""
    if text in GO_TRUE:
        return True
    return False if text in GO_FALSE else None


def parse_cidrs(value: Any, field: str) -> tuple[str, ...]:
    """Comma-separated CIDRs, normalised (host bits cleared)."""
    cidrs = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            cidrs.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as exc:
            raise ConfigError(f"{part!r} is not a CIDR ({exc})", field) from exc
    return tuple(cidrs)


def parse_bit(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 31:
        raise ConfigError(f"{value!r} must be an integer from 0 to 31", field)
    return value


def parse_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{value!r} must be true or false", field)
    return value


def parse_text(value: Any, field: str) -> str:
    return str(value)


def parse_node_port_addresses(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError("expected a list of CIDRs or 'primary'", field)
    result: list[str] = []
    for i, item in enumerate(value):
        if item == "primary":
            result.append("primary")
        else:
            result.extend(parse_cidrs(item, f"{field}[{i}]"))
    return tuple(result)


def parse_cidr_list(value: Any, field: str) -> tuple[str, ...]:
    """A YAML list of CIDRs (a bare address is a /32 or /128), normalised."""
    if not isinstance(value, list):
        raise ConfigError("expected a list of CIDRs", field)
    result: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or "," in item or not item.strip():
            raise ConfigError(f"{item!r} is not a CIDR", f"{field}[{i}]")
        result.extend(parse_cidrs(item, f"{field}[{i}]"))
    return tuple(dict.fromkeys(result))


def parse_bind_address(value: str, field: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`, or `:port` for all addresses) as (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise ConfigError(f"{value!r} is not an address:port", field)
    return host, number


def parse_listen_address(value: Any, field: str) -> str:
    """A bind address kept as text (the servers parse it again when they start)."""
    parse_bind_address(str(value), field)
    return str(value)


def parse_node_ip(value: Any, field: str) -> str:
    """kube-proxy's bindAddress: an IP, where 0.0.0.0 and :: name no address ("")."""
    try:
        address = ipaddress.ip_address(str(value))
    except ValueError:
        raise ConfigError(f"{value!r} is not an IP address", field) from None
    return "" if address.is_unspecified else str(address)


def parse_oom_score_adj(value: Any, field: str) -> int | None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not -1000 <= value <= 1000
    ):
        raise ConfigError(f"{value!r} must be -1000..1000", field)
    score: int | None = value
    return score


def parse_conntrack_count(value: Any, field: str) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{value!r} must be an integer >= 0", field)
    return value or None  # 0 leaves the kernel's value, as upstream


def parse_conntrack_timeout(value: Any, field: str) -> float | None:
    return parse_duration(value, field) or None  # 0s leaves the kernel's value, as upstream


def expect(wanted: str) -> Parser:
    """A parser that accepts only `wanted` (kind, apiVersion)."""

    def check(value: Any, field: str) -> None:
        if value != wanted:
            raise ConfigError(f"{value!r}, expected {wanted}", field)

    return check


def one_of(choices: tuple[str, ...]) -> Parser:
    def check(value: Any, field: str) -> str:
        if value not in choices:
            raise ConfigError(f"{value!r} is not one of {', '.join(choices)}", field)
        return str(value)

    return check


# The proxy modes by name, each with the section of masquerade and sync settings it reads, as
# upstream's v1alpha1 conversion: the nftables mode reads `nftables:` and ignores `iptables:`,
# the other modes the reverse. The modes themselves are sync/modes.py's registry (a layer above
# this one); a test checks that both name the same modes.
MODE_SECTIONS = {"iptables": "iptables", "userspace": "iptables", "nftables": "nftables"}
DEFAULT_MODE = "iptables"  # what `mode: ""` means, as upstream


def parse_mode(value: Any, field: str) -> str:
    if value not in MODE_SECTIONS:
        raise ConfigError(
            f"{value!r} is not supported; kproxy implements {', '.join(MODE_SECTIONS)}", field
        )
    return str(value)


def or_list(names: Iterable[str]) -> str:
    """`a, b or c`."""
    *head, last = sorted(names)
    return f"{', '.join(head)} or {last}" if head else last


def parse_port_range(value: Any, field: str) -> str:
    """kube-proxy's portRange: `begin-end` or `begin+size` (inclusive), or empty for any port."""
    text = str(value).strip()
    if not text:
        return ""
    begin, sep, rest = text.partition("-") if "-" in text else text.partition("+")
    try:
        low, high = int(begin), int(rest)
    except ValueError:
        raise ConfigError(f"{value!r} is not a port range such as 30000-30100", field) from None
    if sep == "+":
        high = low + high - 1
    if not (1 <= low <= high <= 65535):
        raise ConfigError(f"{value!r} is not a range of ports 1-65535", field)
    return f"{low}-{high}"


# The feature gates kproxy acts on, with their defaults (upstream's: alpha gates are off).
FEATURE_GATES = {"KubeProxyNFTablesLocalhostNodePorts": False}


def parse_feature_gates(value: Any, field: str) -> tuple[tuple[str, bool], ...]:
    """`featureGates`: gate name -> true or false. The gates kproxy knows, sorted; any other name
    is kept out (parse_config reports it as an ignored field: upstream knows every Kubernetes
    gate, so a migrated config may name many kproxy has no use for). A value that is not a
    boolean is refused, as upstream refuses it."""
    if not isinstance(value, dict):
        raise ConfigError("expected a mapping of gate names to true or false", field)
    gates = []
    for name, enabled in value.items():
        flag = enabled if isinstance(enabled, bool) else parse_go_bool(str(enabled))
        if flag is None:
            raise ConfigError(f"{name}={enabled!r}: expected true or false", field)
        if name in FEATURE_GATES:
            gates.append((str(name), flag))
    return tuple(sorted(gates))


def feature_gates_flag(value: Any) -> dict[str, Any]:
    """`--feature-gates=A=true,B=false` as the document's mapping (an item without `=` keeps
    its text, which parse_feature_gates then refuses, naming it)."""
    gates: dict[str, Any] = {}
    for item in str(value).split(","):
        name, sep, enabled = item.strip().partition("=")
        if name:
            gates[name.strip()] = enabled.strip() if sep else item.strip()
    return gates
