"""pyroute2's encodings of nf_tables attributes as templates, and netlink's attribute framing:
the ground the encoders (expressions.py, statements.py, encode.py) stand on.

pyroute2 encodes a message in about a millisecond, which would make a cold start at 10,000
services take minutes. But the table is made of few distinct pieces: the same expressions with
another address, port or chain name. So pyroute2 encodes each distinct piece once (the encoders
cache them), and a piece whose value varies is a `Spliced` template: pyroute2's encoding of it
with probe values, with the bytes each value occupies located by a second encoding. Joining
pieces into a message is netlink's attribute framing (a 4-byte length and type, the payload
padded to 4 bytes), with the attribute numbers read from pyroute2's maps."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pyroute2.netlink.nfnetlink.nftsocket import (
    nft_chain_msg,
    nft_rule_msg,
    nft_set_elem_list_msg,
    nft_set_msg,
    nft_table_msg,
)

Attrs = list[tuple[str, Any]]  # pyroute2's form of a message's or a nest's attributes

_NFGEN_HEADER = 20  # nlmsghdr (16 bytes) and nfgenmsg (4)
_HEAD = struct.Struct("<HH")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class EncodingError(RuntimeError):
    """pyroute2's encoding of a piece did not have the layout a template needs."""


def _numbers(cls: Any) -> dict[str, int]:
    """A pyroute2 message class's attribute numbers by name."""
    out: dict[str, int] = {}
    for index, entry in enumerate(cls.nla_map):
        if isinstance(entry[0], int):
            out[entry[1]] = entry[0]
        else:
            out[entry[0]] = index
    return out


TABLE = _numbers(nft_table_msg)
CHAIN = _numbers(nft_chain_msg)
RULE = _numbers(nft_rule_msg)
SET = _numbers(nft_set_msg)
ELEMENTS = _numbers(nft_set_elem_list_msg)


def pyroute2_attrs(cls: Any, attrs: Attrs) -> bytes:
    """A message's attributes as pyroute2 encodes them (after the message's headers)."""
    msg = cls()
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data[_NFGEN_HEADER:])


def attr(kind: int, data: bytes) -> bytes:
    """netlink's framing of one attribute around an encoded payload."""
    length = 4 + len(data)
    return _HEAD.pack(length, kind) + data + _PAD[length % 4]


def payload_of(encoded: bytes) -> bytes:
    """The payload of the one attribute `encoded` holds (its header and padding stripped)."""
    length = _HEAD.unpack_from(encoded)[0]
    if len(encoded) != (length + 3) & ~3:
        raise EncodingError(f"expected one attribute, got {len(encoded)} bytes for {length}")
    return encoded[4:length]


@dataclass(frozen=True, slots=True)
class Spliced:
    """pyroute2's encoding of one shape with its variable values cut out: the constant parts
    around each value, which `fill` joins with new values of the same sizes."""

    parts: tuple[bytes, ...]

    def around(self, value: bytes) -> bytes:
        """`fill` of a one-value template (most are: the hot path)."""
        parts = self.parts
        return parts[0] + value + parts[1]

    def fill(self, *values: bytes) -> bytes:
        out = [self.parts[0]]
        for value, part in zip(values, self.parts[1:], strict=True):
            out.append(value)
            out.append(part)
        return b"".join(out)


def spliced(build: Callable[..., bytes], *sizes: int) -> Spliced:
    """Encode `build` with probe values of the given sizes, then once more per value with a
    different probe: the bytes that change are where that value goes. Refused unless each
    value occupies exactly its own size in one run, the same in every encoding."""
    probes = [b"a" * size for size in sizes]
    base = build(*probes)
    cuts: list[int] = []
    for index, size in enumerate(sizes):
        other = build(*probes[:index], b"b" * size, *probes[index + 1 :])
        changed = [i for i in range(len(base)) if base[i] != other[i]]
        if len(other) != len(base) or len(changed) != size or changed[-1] - changed[0] + 1 != size:
            raise EncodingError(f"value {index} of {size} bytes is not one run in {base.hex()}")
        cuts.append(changed[0])
    parts: list[bytes] = []
    start = 0
    for cut, size in sorted(zip(cuts, sizes, strict=True)):
        if cut < start:
            raise EncodingError(f"values overlap in {base.hex()}")
        parts.append(base[start:cut])
        start = cut + size
    parts.append(base[start:])
    if [c for c, _ in sorted(zip(cuts, sizes, strict=True))] != cuts:
        raise EncodingError("values out of order")
    return Spliced(tuple(parts))


def probe_text(probe: bytes) -> str:
    """A probe value as the text pyroute2 encodes."""
    return probe.decode("ascii")


def name_bytes(value: str) -> bytes:
    """A name as the kernel holds it."""
    return value.encode("utf-8", "surrogateescape")


@lru_cache(maxsize=256)
def _string_template(cls: Any, kind: str, size: int) -> Spliced:
    return spliced(lambda v: pyroute2_attrs(cls, [(kind, probe_text(v))]), size)


def string_attr(cls: Any, kind: str, value: str) -> bytes:
    """One NUL-terminated string attribute. Not cached: most are a chain's name, one of
    hundreds of thousands in a large table, and the callers that repeat one cache theirs."""
    raw = name_bytes(value)
    return _string_template(cls, kind, len(raw)).around(raw)
