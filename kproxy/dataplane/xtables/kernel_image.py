"""What the kernel holds in one x_tables table, and whether it still holds what kproxy last wrote.

Two reads, with different powers:

- `fingerprint()` (IPT_SO_GET_INFO): the entry count and byte size. Cheap, but another program's
  add of one rule and delete of another, of the same size, leaves both as they were. A matching
  fingerprint may let kproxy skip work (a sync that writes nothing); it never lets it commit.
- `read_image()` (IPT_SO_GET_ENTRIES): every entry as the kernel holds it (0.15-0.3 s at 10,000
  services). Two images whose entries are equal byte for byte, packet counters aside, are the
  same table. That is the proof kproxy asks for, under the xtables lock, before it writes a
  change planned from what it committed last; the image is also what every write edits
  (table_writer.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import mmap
import socket
import struct
from dataclasses import dataclass

SOL_IP = 0
SOL_IPV6 = 41
SO_GET_INFO = 64  # IPT_SO_GET_INFO == IP6T_SO_GET_INFO
SO_GET_ENTRIES = 65  # IPT_SO_GET_ENTRIES == IP6T_SO_GET_ENTRIES
TABLE_NAME_LEN = 32
NF_INET_NUMHOOKS = 5
# struct ipt_get_entries: the table name, the size, then the entries, aligned to 8 bytes.
_GET_ENTRIES_HEADER = 40
# Entries cut and hashed at once: enough that hashlib hashes them without the interpreter lock,
# few enough not to copy the whole table at once.
_ENTRIES_PER_BLOCK = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

Fingerprint = tuple[int, int]


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


@dataclass(frozen=True, slots=True)
class _EntryLayout:
    """Where an entry keeps its length and its packet counters (ipt_entry / ip6t_entry)."""

    next_offset_at: int
    counters_at: int
    counters_size: int = 16  # struct xt_counters: packets and bytes, two u64


# Offsets from linux/netfilter_ipv4/ip_tables.h and linux/netfilter_ipv6/ip6_tables.h.
_LAYOUTS = {4: _EntryLayout(next_offset_at=90, counters_at=96), 6: _EntryLayout(142, 152)}


def _socket(family: int) -> tuple[socket.socket, int]:
    af, level = (socket.AF_INET, SOL_IP) if family == 4 else (socket.AF_INET6, SOL_IPV6)
    return socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW), level


def _get_info(sock: socket.socket, level: int, table: str) -> _GetInfo | None:
    info = _GetInfo(name=table.encode())
    length = ctypes.c_uint(ctypes.sizeof(info))
    rc = _libc.getsockopt(
        sock.fileno(), level, SO_GET_INFO, ctypes.byref(info), ctypes.byref(length)
    )
    return info if rc == 0 else None


def fingerprint(family: int, table: str) -> Fingerprint | None:
    """(number of entries, size in bytes) of `table`, or None when it cannot be read."""
    try:
        sock, level = _socket(family)
    except OSError:
        return None
    with sock:
        info = _get_info(sock, level, table)
        return None if info is None else (info.num_entries, info.size)


@dataclass(frozen=True, slots=True)
class TableImage:
    """One table's entries as the kernel handed them out, in one piece."""

    family: int
    name: str
    hooks: bytes  # valid_hooks, hook_entry and underflow: where the built-in chains start
    num_entries: int
    entries: memoryview

    @property
    def fingerprint(self) -> Fingerprint:
        return self.num_entries, len(self.entries)


def read_image(family: int, table: str) -> TableImage | None:
    """All entries of `table`, or None when the table cannot be read (no such table, no module).
    Raises OSError only when the table changes between the two reads: read again."""
    try:
        sock, level = _socket(family)
    except OSError:
        return None
    with sock:
        for _ in range(3):  # the size is read first; a write in between makes the copy fail
            info = _get_info(sock, level, table)
            if info is None:
                return None
            # An anonymous mapping: its pages are zero without a pass over them (bytearray(n)
            # clears its n bytes holding the interpreter lock: 30-50 ms for nat at 10,000
            # services, in a background reader, stalling the thread planning meanwhile). The
            # kernel faults them in as it copies, and the entries are used where it wrote them,
            # never copied; the mapping goes back whole once the last view of it is gone.
            buf = mmap.mmap(-1, _GET_ENTRIES_HEADER + info.size)
            struct.pack_into(f"{TABLE_NAME_LEN}sI", buf, 0, table.encode(), info.size)
            length = ctypes.c_uint(len(buf))
            raw = (ctypes.c_char * len(buf)).from_buffer(buf)
            rc = _libc.getsockopt(sock.fileno(), level, SO_GET_ENTRIES, raw, ctypes.byref(length))
            del raw  # a ctypes view pins the mapping; memoryviews below need none
            if rc == 0:
                hooks = bytes(info)[TABLE_NAME_LEN : TABLE_NAME_LEN + 4 + 8 * NF_INET_NUMHOOKS]
                entries = memoryview(buf)[_GET_ENTRIES_HEADER:]
                return TableImage(family, table, hooks, info.num_entries, entries)
        raise OSError(ctypes.get_errno(), f"table {table} kept changing while it was read")


class ImageMatch:
    """Tells whether another image of the same table holds the same entries as `image`, packet
    and byte counters aside (they move with traffic, the rules do not).

    It keeps a digest of the entries, not the entries: struct formats that skip the 16 counter
    bytes of every entry cut an image into its counter-free pieces (at C speed), a block of 4,096
    entries at a time, and a SHA-256 of those pieces stands for them. Building it walks every
    entry once (about 0.1 s of CPU for nat at 10,000 services, 290,000 entries, done off the
    sync's path); each comparison afterwards cuts and hashes the other image block by block
    (about 0.05 s, the hash without the interpreter lock). Keeping the pieces themselves would cost
    about the table's size (54 MB at 10,000 services), and cutting a whole image at once as much
    again while it runs.
    """

    def __init__(self, image: TableImage) -> None:
        self.fingerprint = image.fingerprint
        self.hooks = image.hooks
        self._blocks = _blocks(image)
        self._digest = self._hash(image.entries)

    def _hash(self, entries: memoryview) -> bytes | None:
        if self._blocks is None or len(entries) != sum(fmt.size for _, fmt in self._blocks):
            return None
        digest = hashlib.sha256()
        for at, fmt in self._blocks:
            digest.update(b"".join(fmt.unpack_from(entries, at)))
        return digest.digest()

    def same(self, other: ImageMatch) -> bool:
        """Whether `other` was made from the same entries, counters aside."""
        return self._digest is not None and (self.fingerprint, self.hooks, self._digest) == (
            other.fingerprint,
            other.hooks,
            other._digest,
        )

    def matches(self, image: TableImage) -> bool:
        if image.fingerprint != self.fingerprint or image.hooks != self.hooks:
            return False
        digest = self._hash(image.entries)
        return digest is not None and digest == self._digest


Blocks = tuple[tuple[int, struct.Struct], ...]


def _blocks(image: TableImage) -> Blocks | None:
    """Formats that cut the entries around each entry's counters, one per block of entries, with
    the offset each block starts at; None for a malformed image (one that matches nothing).

    One pass collects every entry's length (the only per-entry work in Python); the piece from
    one entry's counters to the next's is as long as the entry less its counters, so its code
    is the same for every entry of that length, and each block's format is joined from them."""
    layout = _LAYOUTS[image.family]
    entries, size = image.entries, len(image.entries)
    counters_at, counters_size = layout.counters_at, layout.counters_size
    length_of = struct.Struct("<H").unpack_from
    at = layout.next_offset_at
    lengths: list[int] = []
    offset = 0
    while offset < size:
        if offset + counters_at + counters_size > size:
            return None
        (step,) = length_of(entries, offset + at)
        if step < counters_at + counters_size:  # 0 would never end; less cuts the counters
            return None
        lengths.append(step)
        offset += step
    if offset != size:
        return None
    code = {n: f"{n - counters_size}s{counters_size}x" for n in set(lengths)}
    head = f"<{counters_at}s{counters_size}x"
    blocks = []
    block_at = 0
    for first in range(0, len(lengths), _ENTRIES_PER_BLOCK):
        block = lengths[first : first + _ENTRIES_PER_BLOCK]
        tail = f"{block[-1] - counters_at - counters_size}s"
        blocks.append(
            (block_at, struct.Struct(head + "".join(map(code.__getitem__, block[:-1])) + tail))
        )
        block_at += sum(block)
    return tuple(blocks)
