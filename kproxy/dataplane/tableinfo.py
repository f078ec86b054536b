"""A cheap fingerprint of a kernel table: its entry count and byte size (IPT_SO_GET_INFO).

Reading a table's rules copies all of it (0.4 s at 10,000 services); asking for its info does not.
kproxy records the fingerprint after each of its commits: while it is unchanged, no other program
has written the table, so kproxy can trust what it committed instead of reading the rules back.
Any write that adds or removes a rule, or changes its size, changes the fingerprint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket

SOL_IP = 0
SOL_IPV6 = 41
SO_GET_INFO = 64  # IPT_SO_GET_INFO == IP6T_SO_GET_INFO
TABLE_NAME_LEN = 32
NF_INET_NUMHOOKS = 5

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _GetInfo(ctypes.Structure):
    """struct ipt_getinfo / ip6t_getinfo."""

    _fields_ = [
        ("name", ctypes.c_char * TABLE_NAME_LEN),
        ("valid_hooks", ctypes.c_uint),
        ("hook_entry", ctypes.c_uint * NF_INET_NUMHOOKS),
        ("underflow", ctypes.c_uint * NF_INET_NUMHOOKS),
        ("num_entries", ctypes.c_uint),
        ("size", ctypes.c_uint),
    ]


def table_info(family: int, table: str) -> tuple[int, int] | None:
    """(number of entries, size in bytes) of `table`, or None when it cannot be read."""
    af, level = (socket.AF_INET, SOL_IP) if family == 4 else (socket.AF_INET6, SOL_IPV6)
    try:
        sock = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError:
        return None
    with sock:
        info = _GetInfo(name=table.encode())
        length = ctypes.c_uint(ctypes.sizeof(info))
        rc = _libc.getsockopt(
            sock.fileno(), level, SO_GET_INFO, ctypes.byref(info), ctypes.byref(length)
        )
        if rc != 0:
            return None
        return info.num_entries, info.size
