"""Replacing one x_tables table in the kernel (IPT_SO_SET_REPLACE / IP6T_SO_SET_REPLACE), and
giving the carried entries their packet counters back (IPT_SO_SET_ADD_COUNTERS), as libiptc's
commit does.

The kernel swaps the whole table at once and hands back the old table's counters, one per
entry in the old order; the new table starts at zero, so the counters of every entry that
survived are added back at its new place. The replace names the entry count the caller read
(`num_counters`); the kernel refuses it with EAGAIN when the table has another count by then,
i.e. when a writer that ignores the xtables lock came in between (`TableChanged`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket

from kproxy.dataplane.xtables.kernel_image import NF_INET_NUMHOOKS, TABLE_NAME_LEN
from kproxy.dataplane.xtables.table_compile import REPLACE_HEADER, Compiled
from kproxy.errors import DataplaneError

SOL_IP = 0
SOL_IPV6 = 41
SO_SET_REPLACE = 64  # IPT_SO_SET_REPLACE == IP6T_SO_SET_REPLACE
SO_SET_ADD_COUNTERS = 65
COUNTERS_SIZE = 16  # struct xt_counters: packets and bytes, two u64

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _Replace(ctypes.Structure):
    """struct ipt_replace / ip6t_replace, without the entries that follow it."""

    _fields_ = [
        ("name", ctypes.c_char * TABLE_NAME_LEN),
        ("valid_hooks", ctypes.c_uint),
        ("num_entries", ctypes.c_uint),
        ("size", ctypes.c_uint),
        ("hook_entry", ctypes.c_uint * NF_INET_NUMHOOKS),
        ("underflow", ctypes.c_uint * NF_INET_NUMHOOKS),
        ("num_counters", ctypes.c_uint),
        ("counters", ctypes.c_void_p),  # where the kernel writes the old table's counters
    ]


class _CountersInfo(ctypes.Structure):
    """struct xt_counters_info, without the counters that follow it."""

    _fields_ = [
        ("name", ctypes.c_char * TABLE_NAME_LEN),
        ("num_counters", ctypes.c_uint),
        ("_align", ctypes.c_uint64 * 0),  # the counters are u64s
    ]


assert ctypes.sizeof(_Replace) == REPLACE_HEADER
assert ctypes.sizeof(_CountersInfo) == 40


class TableChanged(Exception):
    """The kernel refused the replace: the table's entry count is no longer the one read."""


def replace_table(
    family: int, table: str, valid_hooks: int, compiled: Compiled, num_counters: int
) -> None:
    """Replace `table` with `compiled` (built from an image of `num_counters` entries) and add
    back the old counters of the entries carried over."""
    blob, size = compiled.blob, compiled.size
    old = (ctypes.c_char * (num_counters * COUNTERS_SIZE or 1))()
    header = _Replace.from_buffer(blob)
    header.name = table.encode()
    header.valid_hooks = valid_hooks
    header.num_entries = compiled.num_entries
    header.size = size - REPLACE_HEADER
    header.hook_entry[:] = compiled.hook_entry
    header.underflow[:] = compiled.underflow
    header.num_counters = num_counters
    header.counters = ctypes.addressof(old)
    del header  # a ctypes view pins the bytearray
    af, level = (socket.AF_INET, SOL_IP) if family == 4 else (socket.AF_INET6, SOL_IPV6)
    with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        raw = (ctypes.c_char * size).from_buffer(blob)
        rc = _libc.setsockopt(sock.fileno(), level, SO_SET_REPLACE, raw, size)
        err = ctypes.get_errno()
        del raw
        if rc != 0:
            if err == errno.EAGAIN:
                raise TableChanged(table)
            raise DataplaneError(f"the kernel refused table {table}: {os.strerror(err)}")
        counters = _new_counters(table, compiled, memoryview(old))
        raw = (ctypes.c_char * len(counters)).from_buffer(counters)
        rc = _libc.setsockopt(sock.fileno(), level, SO_SET_ADD_COUNTERS, raw, len(counters))
        err = ctypes.get_errno()
        del raw
        if rc != 0:
            raise DataplaneError(
                f"table {table} was written, but its counters were not: {os.strerror(err)}"
            )


def _new_counters(table: str, compiled: Compiled, old: memoryview) -> bytearray:
    """xt_counters_info: each carried entry's old counters at its new index, zero elsewhere."""
    head = ctypes.sizeof(_CountersInfo)
    counters = bytearray(head + compiled.num_entries * COUNTERS_SIZE)
    info = _CountersInfo.from_buffer(counters)
    info.name = table.encode()
    info.num_counters = compiled.num_entries
    del info
    for new, index, count in compiled.carried:
        at = head + new * COUNTERS_SIZE
        counters[at : at + count * COUNTERS_SIZE] = old[
            index * COUNTERS_SIZE : (index + count) * COUNTERS_SIZE
        ]
    return counters
