"""IP addresses and CIDRs from Kubernetes objects, read as the API server and kube-proxy read
them, and written back in the one canonical form the kernel prints, so tables converge.

Legacy forms the API server still holds (it accepted them before its strict IP validation, and
keeps them on objects that do not change the field) are read as kube-proxy reads them with
Go's sloppy parser: IPv4 octets with leading zeros are decimal (`010.001.002.003` is
10.1.2.3), and an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is that IPv4 address."""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

from kproxy.model.fields import FieldReader, show

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_PREFIX = re.compile(r"[0-9]{1,3}")
_OCTETS = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
_LINK_LOCAL_MULTICAST_V4 = ipaddress.ip_network("224.0.0.0/24")
_AF_INET = socket.AF_INET
_inet_pton, _inet_ntop = socket.inet_pton, socket.inet_ntop


def _link_local_multicast(ip: IPAddress) -> bool:
    """Go's IsLinkLocalMulticast: 224.0.0.0/24, and IPv6 multicast of link-local scope whatever
    its flags (ff02::/16, ff12::/16, ...)."""
    if ip.version == 4:
        return ip in _LINK_LOCAL_MULTICAST_V4
    return ip.packed[0] == 0xFF and ip.packed[1] & 0x0F == 0x02


def _printed_dotted(ip: IPAddress) -> bool:
    """Whether glibc's inet_ntop (what iptables-save uses) writes this IPv6 address with an
    embedded dotted quad (`::10.0.0.1`), which Python's formatting does not: such an address
    would never compare equal when read back."""
    if ip.version != 6:
        return False
    words = [(ip.packed[i] << 8) | ip.packed[i + 1] for i in range(0, 16, 2)]
    return not any(words[:6]) and words[6] != 0


def special_problem(ip: IPAddress, *, vip: bool = False) -> str | None:
    """What makes `ip` special, or None. The API server refuses unspecified, loopback,
    link-local and link-local multicast addresses for externalIPs and endpoint addresses
    (its ValidateNonSpecialIP). A `vip` (an externalIP or load-balancer ingress IP: an address
    a service claims on the node) is also refused when multicast, and load-balancer ingress
    IPs get the whole check, where the API checks only that they are IPs and kube-proxy
    programs any of them: a claimed 127.0.0.1 or 169.254.169.254 would send the node's own
    loopback or metadata traffic to a tenant's pods (issue 19, CVE-2020-8554's kind)."""
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local or _link_local_multicast(ip):
        return "a link-local address"
    if vip and ip.is_multicast:
        return "a multicast address"
    return None


def ip_family(address: str) -> int:
    """4 or 6 for an address or CIDR already validated (as every one past the converter is):
    only IPv6 text holds a colon, so no parsing is needed."""
    return 6 if ":" in address else 4


def _read_ip(text: str) -> IPAddress | None:
    """`text` as Go's sloppy ParseIP reads it, or None. Zone indexes (`fe80::1%lo`) are refused,
    as Go refuses them."""
    octets = _OCTETS.fullmatch(text)
    if octets:
        values = [int(o) for o in octets.groups()]
        return ipaddress.IPv4Address(bytes(values)) if max(values) <= 255 else None
    if "%" in text or not text.isascii():
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _checked_ip(reader: FieldReader, text: str, path: str) -> IPAddress:
    ip = _read_ip(text)
    if ip is None:
        raise reader.fail(path, f"{show(text)} is not an IP address")
    if _printed_dotted(ip):
        # kproxy's own limit, not the API's: iptables-save prints these (deprecated since RFC
        # 4291) as `::10.0.0.1`, which would never read back equal to the rule written.
        raise reader.fail(path, f"{show(text)}: an IPv4-compatible IPv6 address is not supported")
    return ip


def canonical_ipv4(text: str, *, special_ok: bool = False, vip: bool = False) -> str | None:
    """parse_ip's answer for an IPv4 address already in canonical form that it accepts, without
    building an ipaddress object (a tenth of the cost: it runs once per endpoint of the
    cluster); None for any other text, left to parse_ip's full reading, which words refusals.
    Canonical means what inet_ntop writes back, whatever the C library's inet_pton accepts."""
    try:
        packed = _inet_pton(_AF_INET, text)
    except (OSError, ValueError):  # not dotted-quad text (or a NUL or surrogate in it)
        return None
    if _inet_ntop(_AF_INET, packed) != text:
        return None
    a = packed[0]
    # special_problem's ranges: 0.0.0.0, 127/8, 169.254/16, 224.0.0/24, and 224/4 for a VIP.
    if not special_ok and (
        a == 127
        or (a == 169 and packed[1] == 254)
        or (a == 224 and packed[1] == 0 and packed[2] == 0)
        or (vip and 224 <= a <= 239)
        or packed == b"\0\0\0\0"
    ):
        return None
    return text


def parse_ip(
    reader: FieldReader, value: Any, path: str, *, special_ok: bool = False, vip: bool = False
) -> str:
    """An IP address in canonical form. Special addresses (see special_problem) are refused
    unless `special_ok`."""
    text = reader.string(value, path)
    fast = canonical_ipv4(text, special_ok=special_ok, vip=vip)
    return fast if fast is not None else read_ip_fully(reader, text, path, special_ok, vip)


def read_ip_fully(reader: FieldReader, text: str, path: str, special_ok: bool, vip: bool) -> str:
    """parse_ip's reading of any text, through ipaddress."""
    ip = _checked_ip(reader, text, path)
    problem = None if special_ok else special_problem(ip, vip=vip)
    if problem:
        raise reader.fail(path, f"{show(text)} is {problem}")
    return str(ip)


def parse_cidr(reader: FieldReader, value: Any, path: str) -> str:
    """A CIDR (`10.0.0.0/8`; a bare address is a /32 or /128), host bits cleared, read as Go's
    sloppy ParseCIDR reads it (an IPv4-mapped network `::ffff:10.0.0.0/104` is 10.0.0.0/8)."""
    text = reader.string(value, path)
    address, slash, prefix = text.partition("/")
    ip = _read_ip(address)
    if ip is None or (slash and not _PREFIX.fullmatch(prefix)):
        raise reader.fail(path, f"{show(text)} is not a CIDR")
    length = int(prefix) if slash else ip.max_prefixlen
    if ip.version == 4 and ":" in address:
        length -= 96  # Go keeps the 128-bit mask of a mapped address; its last 32 bits count
    try:
        net: IPNetwork = ipaddress.ip_network((ip, length), strict=False)
    except ValueError:
        raise reader.fail(path, f"{show(text)} is not a CIDR") from None
    if _printed_dotted(net.network_address):
        raise reader.fail(path, f"{show(text)}: an IPv4-compatible IPv6 network is not supported")
    return str(net)


AllowList = tuple[IPNetwork, ...] | None  # None allows every address


def build_allow_list(cidrs: tuple[str, ...] | None) -> AllowList:
    """The networks of already validated CIDRs (allowedExternalIPCIDRs); None allows all."""
    return None if cidrs is None else tuple(ipaddress.ip_network(c) for c in cidrs)


def allows(allowed: AllowList, ip: str) -> bool:
    """Whether `ip` (canonical, as the converter writes it) is in the allow-list."""
    if allowed is None:
        return True
    address = ipaddress.ip_address(ip)
    return any(address in net for net in allowed)
