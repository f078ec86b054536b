"""Two one-round-trip questions to nf_tables (about 50 us each), asked without reading a table.

The ruleset generation of this network namespace: a counter the kernel bumps on every committed
transaction, by any program, in any table or family, so the nft backend knows whether anything at
all was written since it last looked.

Whether a table exists: reading one with iptables-nft-save dumps every chain of its family, and
the kernel restarts that dump from the first chain for each buffer it fills, so a family holding
the nftables mode's tens of thousands of chains makes each read cost seconds. The iptables mode's
leftover check asks first, and reads only the tables that are there."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFT_MSG_NEWGEN = 15
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFTA_GEN_ID = 1
NFTA_TABLE_NAME = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_ERRNO = struct.Struct("=i")
_NFPROTO = {4: 2, 6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id
_ATTR = struct.Struct("=HH")


def _ask(message: int, flags: int, family: int, attributes: bytes = b"") -> bytes | None:
    """The kernel's answer to one nf_tables request; None when the kernel has no nf_tables."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError:
        return None
    with sock:
        kind = (NFNL_SUBSYS_NFTABLES << 8) | message
        body = _NFGEN.pack(family, 0, 0) + attributes
        sock.sendto(_NLMSG.pack(_NLMSG.size + len(body), kind, flags, 1, 0) + body, (0, 0))
        return sock.recv(65536)


def read_generation() -> int | None:
    """The current generation, or None when the kernel has no nf_tables to ask."""
    data = _ask(NFT_MSG_GETGEN, NLM_F_REQUEST, socket.AF_UNSPEC)
    return None if data is None else _parse_generation(data)


def table_exists(family: int, name: str) -> bool | None:
    """Whether the `ip` (4) or `ip6` (6) table `name` exists; None when the kernel cannot say
    (no nf_tables, or an answer other than the table or "no such table")."""
    text = name.encode() + b"\0"
    padded = text + b"\0" * (-len(text) % 4)
    attribute = _ATTR.pack(_ATTR.size + len(text), NFTA_TABLE_NAME) + padded
    data = _ask(NFT_MSG_GETTABLE, NLM_F_REQUEST, _NFPROTO[family], attribute)
    return None if data is None else _parse_table_answer(data)


def _messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, offset, length) of each netlink message in `data`, until one is malformed."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        yield kind, offset, length
        offset += (length + 3) & ~3


def _parse_table_answer(data: bytes) -> bool | None:
    for kind, offset, length in _messages(data):
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE:
            return True
        if kind == NLMSG_ERROR and length >= _NLMSG.size + _ERRNO.size:
            (error,) = _ERRNO.unpack_from(data, offset + _NLMSG.size)
            return False if error == -errno.ENOENT else None
    return None


def _parse_generation(data: bytes) -> int | None:
    for kind, offset, length in _messages(data):
        if kind & 0xFF == NFT_MSG_NEWGEN and kind >> 8 == NFNL_SUBSYS_NFTABLES:
            pos, end = offset + _NLMSG.size + _NFGEN.size, offset + length
            while pos + _ATTR.size <= end:
                size, attr = _ATTR.unpack_from(data, pos)
                if size < _ATTR.size:
                    return None
                if attr & 0x3FFF == NFTA_GEN_ID and size >= 8:
                    return int(struct.unpack_from(">I", data, pos + _ATTR.size)[0])
                pos += (size + 3) & ~3
            return None
        if kind == NLMSG_ERROR:
            return None
    return None
