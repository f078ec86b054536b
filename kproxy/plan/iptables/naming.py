"""Chain names, hashed exactly as upstream kube-proxy hashes them, so operators' tooling and
`kube-proxy --cleanup` recognise them."""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from kproxy.model.endpoint import Endpoint
from kproxy.model.service import ServicePortName

# Prefixes of chains that belong to one service port or endpoint.
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
MAX_CHAIN_NAME = 28  # libiptc: XT_EXTENSION_MAXNAMELEN - 1


def _hash16(text: str) -> str:
    # 16 base32 characters are exactly the first 10 bytes of the digest. The converter lets only
    # ASCII names through; surrogatepass keeps a stray lone surrogate from raising here.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest[:10]).decode()


# Per service port, cached: each port's names use it several times. An endpoint's chain name is
# made once per plan of its port (the planner keeps it for the port's rules), so it is not.
@lru_cache(maxsize=1 << 16)
def port_proto_hash(spn: ServicePortName) -> str:
    return _hash16(str(spn) + spn.protocol.lower)


def service_chain(spn: ServicePortName) -> str:
    return "KUBE-SVC-" + port_proto_hash(spn)


def local_service_chain(spn: ServicePortName) -> str:
    return "KUBE-SVL-" + port_proto_hash(spn)


def external_chain(spn: ServicePortName) -> str:
    return "KUBE-EXT-" + port_proto_hash(spn)


def firewall_chain(spn: ServicePortName) -> str:
    return "KUBE-FW-" + port_proto_hash(spn)


def endpoint_chain(spn: ServicePortName, endpoint: Endpoint) -> str:
    return "KUBE-SEP-" + _hash16(spn_text(spn) + spn.protocol.lower + str(endpoint))


@lru_cache(maxsize=1 << 16)
def spn_text(spn: ServicePortName) -> str:
    """str(spn), computed once: every comment and chain name of a port uses it."""
    return str(spn)


def is_service_chain(name: str) -> bool:
    return name.startswith(SERVICE_CHAIN_PREFIXES)


@lru_cache(maxsize=1 << 16)
def spn_sort_key(spn: ServicePortName) -> tuple[str, str, str, str]:
    """The order service ports are planned in (namespace, name, port, protocol)."""
    return (spn.service.namespace, spn.service.name, spn.port, spn.protocol.value)
