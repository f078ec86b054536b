"""The nf_tables ruleset generation of this network namespace: a counter the kernel bumps on every
committed transaction, by any program, in any table or family. Reading it costs one netlink round
trip (about 50 us), so the nft backend knows without reading a table whether anything at all was
written since it last looked."""

from __future__ import annotations

import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id
_ATTR = struct.Struct("=HH")


def read_generation() -> int | None:
    """The current generation, or None when the kernel has no nf_tables to ask."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError:
        return None
    with sock:
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
        sock.sendto(_NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST, 1, 0) + body, (0, 0))
        data = sock.recv(65536)
    return _parse_generation(data)


def _parse_generation(data: bytes) -> int | None:
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return None
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
        offset += (length + 3) & ~3
    return None
