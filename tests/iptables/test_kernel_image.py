"""ImageMatch: two images of a table match when every entry is equal but for its counters."""

from __future__ import annotations

import struct
import sys

import pytest

from kproxy.dataplane.xtables import kernel_image
from kproxy.dataplane.xtables.kernel_image import ImageMatch, TableImage

# Where ipt_entry keeps next_offset and its counters (linux/netfilter_ipv4/ip_tables.h).
NEXT_OFFSET_AT, COUNTERS_AT, HEADER = 90, 96, 112


def entry(payload: bytes, packets: int = 0, size: int = 152) -> bytes:
    raw = bytearray(size)
    raw[:4] = b"\x0a\x00\x00\x01"
    struct.pack_into("<H", raw, NEXT_OFFSET_AT, size)
    struct.pack_into("<QQ", raw, COUNTERS_AT, packets, packets * 60)
    raw[HEADER : HEADER + len(payload)] = payload
    return bytes(raw)


def image(*entries: bytes, hooks: bytes = b"\x01" * 44) -> TableImage:
    return TableImage(4, "nat", hooks, len(entries), memoryview(b"".join(entries)))


def test_counters_do_not_count() -> None:
    kept = ImageMatch(image(entry(b"A"), entry(b"B", size=200)))
    assert kept.matches(image(entry(b"A", packets=7), entry(b"B", packets=99, size=200)))


@pytest.mark.parametrize(
    "other",
    [
        image(entry(b"A"), entry(b"C", size=200)),  # a rule replaced by one of the same size
        image(entry(b"B", size=200), entry(b"A")),  # the same rules in another order
        image(entry(b"A"), entry(b"B", size=200), hooks=b"\x02" * 44),  # chains moved
        image(entry(b"A")),  # a rule gone
        image(entry(b"A"), entry(b"B", size=200), entry(b"D")),  # a rule added
    ],
)
def test_any_other_difference_does(other: TableImage) -> None:
    assert not ImageMatch(image(entry(b"A"), entry(b"B", size=200))).matches(other)


def test_a_byte_anywhere_but_the_counters_counts() -> None:
    base = image(entry(b"A"), entry(b"B"))
    kept = ImageMatch(base)
    for offset in range(len(base.entries)):
        if COUNTERS_AT <= offset % 152 < HEADER:
            continue
        changed = bytearray(base.entries)
        changed[offset] ^= 0xFF
        assert not kept.matches(TableImage(4, "nat", base.hooks, 2, memoryview(changed))), offset


def test_a_malformed_image_matches_nothing() -> None:
    broken = image(entry(b"A")[:NEXT_OFFSET_AT] + b"\x00\x00" + entry(b"A")[NEXT_OFFSET_AT + 2 :])
    assert not ImageMatch(broken).matches(broken)


def test_an_entry_shorter_than_its_counters_matches_nothing() -> None:
    short = (
        entry(b"A")[:NEXT_OFFSET_AT] + struct.pack("<H", 104) + entry(b"A")[NEXT_OFFSET_AT + 2 :]
    )
    broken = image(short[:104], entry(b"B"))
    assert not ImageMatch(broken).matches(broken)


def test_entries_cut_block_by_block_compare_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image is cut and hashed a block of entries at a time: every block counts, its
    counters do not, whatever sizes its entries have."""
    monkeypatch.setattr(kernel_image, "_ENTRIES_PER_BLOCK", 2)
    sizes = [152, 160, 168, 152, 200]

    def table(payloads: bytes, packets: int = 0) -> TableImage:
        return image(
            *(entry(bytes([p]), packets, size) for p, size in zip(payloads, sizes, strict=True))
        )

    kept = ImageMatch(table(b"ABCDE"))
    assert kept.matches(table(b"ABCDE", packets=5))
    for i in range(5):
        changed = b"ABCDE"[:i] + b"Z" + b"ABCDE"[i + 1 :]
        assert not kept.matches(table(changed)), i


def _deep_size(obj: object) -> int:
    size = sys.getsizeof(obj)
    if isinstance(obj, tuple):
        size += sum(_deep_size(item) for item in obj)
    return size


def test_a_kept_match_holds_a_digest_not_the_entries() -> None:
    """The agent keeps one ImageMatch per committed table between syncs: it must not cost about
    the table's size again (54 MB for nat at 10,000 services), as the entries' pieces did."""
    table = image(*(entry(bytes([i % 256])) for i in range(10_000)))
    kept = ImageMatch(table)
    held = sum(_deep_size(value) for value in vars(kept).values())
    assert held < len(table.entries) / 2, (held, len(table.entries))
