"""IP addresses and CIDRs from Kubernetes objects, refused where the API server refuses them or
where the kernel would print them back in another form (a table that never converges)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from kproxy.model.fields import FieldReader, show

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_PREFIX = re.compile(r"[0-9]{1,3}")
_LINK_LOCAL_MULTICAST = (
    ipaddress.ip_network("224.0.0.0/24"),
    ipaddress.ip_network("ff02::/16"),
)


def _printed_dotted(ip: IPAddress) -> bool:
    """Whether glibc's inet_ntop (what iptables-save uses) writes this IPv6 address with an
    embedded dotted quad (`::ffff:10.0.0.1`, `::10.0.0.1`), which Python's formatting does not:
    such an address would never compare equal when read back."""
    if ip.version != 6:
        return False
    words = [(ip.packed[i] << 8) | ip.packed[i + 1] for i in range(0, 16, 2)]
    if any(words[:5]):
        return False
    return words[5] == 0xFFFF or (words[5] == 0 and words[6] != 0)


def _special(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local or any(ip in net for net in _LINK_LOCAL_MULTICAST):
        return "a link-local address"
    return None


def ip_family(address: str) -> int:
    """4 or 6 for an address or CIDR already validated (as every one past the converter is):
    only IPv6 text holds a colon, so no parsing is needed."""
    return 6 if ":" in address else 4


def parse_ip(reader: FieldReader, value: Any, path: str, *, special_ok: bool = False) -> str:
    """An IP address in canonical form. Zone indexes (`fe80::1%lo`), IPv4-mapped and
    IPv4-compatible IPv6 addresses are refused; unspecified, loopback and link-local ones too
    unless `special_ok` (the API server refuses those for ClusterIPs, externalIPs and endpoint
    addresses)."""
    text = reader.string(value, path)
    if "%" in text:
        raise reader.fail(path, f"{show(text)}: a zone index is not allowed")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise reader.fail(path, f"{show(text)} is not an IP address") from None
    if _printed_dotted(ip):
        raise reader.fail(path, f"{show(text)}: IPv4-mapped or -compatible IPv6 is not allowed")
    problem = None if special_ok else _special(ip)
    if problem:
        raise reader.fail(path, f"{show(text)} is {problem}")
    return str(ip)


def parse_cidr(reader: FieldReader, value: Any, path: str) -> str:
    """A CIDR (`10.0.0.0/8`; a bare address is a /32 or /128), host bits cleared."""
    text = reader.string(value, path)
    _, slash, prefix = text.partition("/")
    if "%" in text or (slash and not _PREFIX.fullmatch(prefix)):
        raise reader.fail(path, f"{show(text)} is not a CIDR")
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise reader.fail(path, f"{show(text)} is not a CIDR") from None
    if _printed_dotted(net.network_address):
        raise reader.fail(path, f"{show(text)}: IPv4-mapped or -compatible IPv6 is not allowed")
    return str(net)
