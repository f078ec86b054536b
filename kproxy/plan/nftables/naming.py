"""Object names of the nftables mode, as upstream's nftables proxier names them: fixed names for
the shared chains, sets and maps, and `PREFIX-HASH-namespace/name/protocol/port` for a service
port's chains (`...__ip/port` for an endpoint's), so operators' knowledge carries over."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache

from kproxy.model.endpoint import Endpoint
from kproxy.model.service import ServicePortName

TABLE = "kube-proxy"
TABLE_COMMENT = "rules for kube-proxy"
MAX_NAME = 255  # NFT_NAME_MAXLEN (256) less the NUL, for chains and sets
_LONGEST_PREFIX = len("affinity-")

# Base chains.
FILTER_PREROUTING_PRE_DNAT = "filter-prerouting-pre-dnat"
FILTER_OUTPUT_PRE_DNAT = "filter-output-pre-dnat"
FILTER_INPUT = "filter-input"
FILTER_FORWARD = "filter-forward"
FILTER_OUTPUT = "filter-output"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"
# Shared regular chains.
SERVICES = "services"
MASQUERADING = "masquerading"
MARK_FOR_MASQUERADE = "mark-for-masquerade"
FIREWALL_CHECK = "firewall-check"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"
REJECT_CHAIN = "reject-chain"
# Sets and maps.
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"


_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_BASE32_PAIRS = [a + b for a in _BASE32 for b in _BASE32]  # 10 bits -> 2 characters


def _base32_40(data: bytes) -> str:
    """The base32 text of 5 bytes (8 characters), as base64.b32encode writes it, without its
    pure-Python loop (this runs once per endpoint): four 10-bit pairs."""
    value = int.from_bytes(data[:5], "big")
    pairs = _BASE32_PAIRS
    high = pairs[value >> 30] + pairs[(value >> 20) & 1023]
    return high + pairs[(value >> 10) & 1023] + pairs[value & 1023]


def _hash_and_truncate(text: str) -> str:
    # 8 base32 characters are exactly the digest's first 5 bytes.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    name = _base32_40(digest) + "-" + text
    limit = MAX_NAME - _LONGEST_PREFIX
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _port_text(spn: ServicePortName) -> str:
    return f"{spn.service.namespace}/{spn.service.name}/{spn.protocol.lower}/{spn.port}"


@lru_cache(maxsize=1 << 16)
def port_base(spn: ServicePortName) -> str:
    """`HASH-namespace/name/protocol/port`, the common part of a service port's chain names."""
    return _hash_and_truncate(_port_text(spn))


def service_chain(spn: ServicePortName) -> str:
    return "service-" + port_base(spn)


def local_chain(spn: ServicePortName) -> str:
    return "local-" + port_base(spn)


def external_chain(spn: ServicePortName) -> str:
    return "external-" + port_base(spn)


def firewall_chain(spn: ServicePortName) -> str:
    return "firewall-" + port_base(spn)


def endpoint_base(spn: ServicePortName, ep: Endpoint) -> str:
    return endpoint_base_of(_port_text(spn), ep)


def endpoint_bases(spn: ServicePortName, endpoints: Iterable[Endpoint]) -> dict[int, str]:
    """endpoint_base of each endpoint, by the endpoint's id (the port's text made once)."""
    text = _port_text(spn)
    return {id(ep): endpoint_base_of(text, ep) for ep in endpoints}


def endpoint_base_of(port_text: str, ep: Endpoint) -> str:
    # nft's parser takes no ":" in a name, so an IPv6 address is written with "." instead,
    # keeping the listed table loadable with `nft -f`.
    return _hash_and_truncate(f"{port_text}__{ep.ip.replace(':', '.')}/{ep.port}")


ENDPOINT_PREFIX = "endpoint-"
AFFINITY_PREFIX = "affinity-"


def endpoint_chain(spn: ServicePortName, ep: Endpoint) -> str:
    return ENDPOINT_PREFIX + endpoint_base(spn, ep)


def affinity_set(spn: ServicePortName, ep: Endpoint) -> str:
    return AFFINITY_PREFIX + endpoint_base(spn, ep)
