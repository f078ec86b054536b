"""Fast construction of rule entries (ipt_entry / ip6t_entry, targets named as libiptc takes them).

Building a python-iptables Rule costs about 0.15 ms a rule (parameter parsing through libxtables,
table look-ups per target), which dominates a sync at scale. But kproxy's rules come in few
shapes: the same matches and targets with different addresses, ports, comments, probabilities and
chain names. So each shape is built through python-iptables once, twice in fact, with two sets of
probe values; comparing the two entries locates the bytes each value occupies. Every later rule of
that shape is the template's bytes with those fields overwritten, handed to the writer as is
(table_blob.py turns a target's name into its verdict or jump).

A shape whose fields cannot be located unambiguously is never patched: its rules are built through
python-iptables every time. The result is checked against the plain path, entry for entry, by
integration/iptables/test_fast_path.py, which also reads every entry back from the kernel.
"""

from __future__ import annotations

import ctypes
import mmap
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from types import ModuleType
from typing import Any

from kproxy.model.addresses import ip_family
from kproxy.rules.fragments import STATISTIC_SCALE
from kproxy.rules.ir import Match, Opt, Rule, Target

COMMENT_SIZE = 256  # xt_comment_info.comment
RECENT_NAME_SIZE = 200  # xt_recent_mtinfo.name
TARGET_NAME_SIZE = 29  # xt_entry_target.u.user.name

Encoder = Callable[[str], bytes]
Buffer = bytearray | mmap.mmap
MAX_ENTRY = 0xFFFF  # next_offset is a u16


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one variable value goes in the entry: each part is an offset and the encoder of
    the bytes written there (an address has its address and its mask, a DNAT destination its
    addresses and ports)."""

    parts: tuple[tuple[int, Encoder], ...]


@dataclass(frozen=True, slots=True)
class Template:
    entry: bytes
    slots: tuple[_Slot, ...]
    target_offset: int
    label: str  # the target's name, the same in every rule of the shape ...
    jump: int | None  # ... unless it is a jump: then the chain is this value

    def fill_into(self, values: list[str], out: Buffer, at: int) -> None:
        out[at : at + len(self.entry)] = self.entry
        for slot, value in zip(self.slots, values, strict=True):
            for offset, encode in slot.parts:
                data = encode(value)
                out[at + offset : at + offset + len(data)] = data


def _padded(size: int) -> Encoder:
    def encode(value: str) -> bytes:
        raw = value.encode()[: size - 1]
        return raw + bytes(size - len(raw))

    return encode


def _dport(value: str) -> bytes:
    port = int(value)
    return struct.pack("=HH", port, port)


def _probability(value: str) -> bytes:
    # libxt_statistic stores lround(2^31 * p).
    return struct.pack("=I", int(float(value) * STATISTIC_SCALE + 0.5))


def _u32(value: str) -> bytes:
    return struct.pack("=I", int(value))


@lru_cache(maxsize=1 << 12)
def _network(cidr: str) -> tuple[bytes, bytes]:
    """(address, mask) bytes of a canonical CIDR such as `10.0.0.1/32` (as rules carry them)."""
    address, _, length = cidr.partition("/")
    family = socket.AF_INET6 if ip_family(address) == 6 else socket.AF_INET
    packed = socket.inet_pton(family, address)
    bits = len(packed) * 8
    prefix = int(length) if length else bits
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)
    return packed, mask.to_bytes(len(packed), "big")


def _network_address(cidr: str) -> bytes:
    return _network(cidr)[0]


def _network_mask(cidr: str) -> bytes:
    return _network(cidr)[1]


@lru_cache(maxsize=1 << 12)
def _split_destination(value: str) -> tuple[bytes, bytes]:
    """(address, port) bytes of a DNAT destination `ip:port` or `[ip6]:port`."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ip_family(host) == 6 else socket.AF_INET
    return socket.inet_pton(family, host), struct.pack("!H", int(port))


def _destination_part(part: int) -> Encoder:
    """Encoder of a DNAT destination's address (part 0) or port (part 1)."""
    return lambda value: _split_destination(value)[part]


def _probability_probe(stored: int) -> str:
    """A probability whose stored 31-bit fraction is `stored` (chosen without zero bytes, so
    its encoding cannot be mistaken for padding or a header field)."""
    return f"{stored / STATISTIC_SCALE:.11f}"


# Kinds of variable values: two probe values each, and the encoder of the bytes they become.
_PROBES: dict[str, tuple[str, str]] = {
    "comment": ("kproxy-probe-comment-a1", "kproxy-probe-comment-b2"),
    "dport": ("4660", "22136"),
    "probability": (_probability_probe(0x2C3B4A59), _probability_probe(0x1B2C3D4E)),
    "recent-name": ("KPROXY-PROBE-A", "KPROXY-PROBE-B"),
    "recent-seconds": (str(0x12345678), str(0x07654321)),
    # Standard verdicts in a jump's place: python-iptables builds them without looking the name
    # up among the chains of every table (which reads each table with libiptc, and keeps it).
    "jump": ("ACCEPT", "DROP"),
}
_ENCODERS: dict[str, Encoder] = {
    "comment": _padded(COMMENT_SIZE),
    "dport": _dport,
    "probability": _probability,
    "recent-name": _padded(RECENT_NAME_SIZE),
    "recent-seconds": _u32,
    "jump": _padded(TARGET_NAME_SIZE),
}
_ADDRESS_PROBES = {4: ("10.1.2.3/32", "10.4.5.6/32"), 6: ("fd00::a1/128", "fd00::b2/128")}
_DNAT_PROBES = {
    4: ("10.11.12.13:4660", "10.21.22.23:22136"),
    6: ("[fd00::13]:4660", "[fd00::23]:22136"),
}


# (match, option) pairs whose values vary from rule to rule of one shape.
_VARIABLE_OPTS = {
    ("comment", "comment"): "comment",
    ("tcp", "dport"): "dport",
    ("udp", "dport"): "dport",
    ("statistic", "probability"): "probability",
    ("recent", "name"): "recent-name",
    ("recent", "seconds"): "recent-seconds",
}


def _variable_opt(match: str, opt: str) -> str | None:
    return _VARIABLE_OPTS.get((match, opt))


def shape_key(rule: Rule) -> tuple[tuple[Any, ...], list[str]]:
    """A hashable key of the rule's shape and its variable values, in split_rule's order,
    without building any object (this runs once per rule per sync)."""
    values: list[str] = []
    key: list[Any] = [
        rule.src is not None,
        rule.src_invert,
        rule.dst is not None,
        rule.dst_invert,
        rule.in_iface,
        rule.in_invert,
        rule.out_iface,
        rule.out_invert,
        rule.protocol,
        rule.protocol_invert,
    ]
    if rule.src is not None:
        values.append(rule.src)
    if rule.dst is not None:
        values.append(rule.dst)
    for m in rule.matches:
        key.append(m.name)
        for opt in m.opts:
            if not opt.invert and (m.name, opt.name) in _VARIABLE_OPTS:
                key.append(opt.name)
                values.append(opt.value)
            else:
                key.append(opt)
    target = rule.target
    if target is not None and target.name == "DNAT" and len(target.opts) == 1:
        key.append("DNAT")
        values.append(target.opts[0].value)
    elif target is not None and target.is_jump:
        key.append(("jump", target.goto))
        values.append(target.name)
    else:
        key.append(target)
    return tuple(key), values


@dataclass
class _Split:
    """A rule taken apart into its shape (variable values replaced by a probe) and values."""

    kinds: list[str]
    values: list[str]


def split_rule(rule: Rule, family: int, probe: int) -> tuple[Rule, _Split]:
    """The rule's shape with probe set `probe` (0 or 1) in every variable place, and the values."""
    split = _Split([], [])
    fields: dict[str, Any] = {}
    for name in ("src", "dst"):
        value = getattr(rule, name)
        if value is not None:
            split.kinds.append(name)
            split.values.append(value)
            fields[name] = _ADDRESS_PROBES[family][probe]
    matches = []
    for m in rule.matches:
        opts = []
        for opt in m.opts:
            kind = _variable_opt(m.name, opt.name)
            if kind is None or opt.invert:
                opts.append(opt)
                continue
            split.kinds.append(kind)
            split.values.append(opt.value)
            opts.append(Opt(opt.name, _PROBES[kind][probe]))
        matches.append(Match(m.name, tuple(opts)))
    fields["matches"] = tuple(matches)
    target = rule.target
    if target is not None and target.name == "DNAT" and len(target.opts) == 1:
        split.kinds.append("dnat")
        split.values.append(target.opts[0].value)
        target = Target("DNAT", (Opt("to-destination", _DNAT_PROBES[family][probe]),))
    elif target is not None and target.is_jump:
        split.kinds.append("jump")
        split.values.append(target.name)
        target = Target(_PROBES["jump"][probe], goto=target.goto)
    fields["target"] = target
    return replace(rule, **fields), split


def _find_all(haystack: bytes, needle: bytes, start: int) -> list[int]:
    found, pos = [], haystack.find(needle, start)
    while pos >= 0:
        found.append(pos)
        pos = haystack.find(needle, pos + 1)
    return found


class TemplateBuilder:
    """Locates the variable fields of one shape from two probe builds."""

    def __init__(self, family: int, layout: _Layout) -> None:
        self.family = family
        self.header_size = layout.header_size
        self.target_offset_at = layout.target_offset_at
        self.address_offsets = layout.addresses  # src/dst -> (address offset, mask offset)

    def build(self, kinds: list[str], entry_a: bytes, entry_b: bytes) -> Template | None:
        if len(entry_a) != len(entry_b):
            return None
        slots = []
        covered: set[int] = set()
        pairs = self._probe_pairs(kinds)
        for kind, (probe_a, probe_b) in zip(kinds, pairs, strict=True):
            slot = self._locate(kind, probe_a, probe_b, entry_a, entry_b)
            if slot is None:
                return None
            slots.append(slot)
            for offset, encode in slot.parts:
                covered.update(range(offset, offset + len(encode(probe_a))))
        # Every byte the probes changed must be one we write; else some field would be stale.
        if any(
            x != y and i not in covered
            for i, (x, y) in enumerate(zip(entry_a, entry_b, strict=True))
        ):
            return None
        (target_offset,) = struct.unpack_from("=H", entry_a, self.target_offset_at)
        jump = kinds.index("jump") if "jump" in kinds else None
        return Template(
            entry_a, tuple(slots), target_offset, target_label(entry_a, target_offset), jump
        )

    def _probe_pairs(self, kinds: list[str]) -> list[tuple[str, str]]:
        pairs = []
        for kind in kinds:
            if kind in ("src", "dst"):
                pairs.append(_ADDRESS_PROBES[self.family])
            elif kind == "dnat":
                pairs.append(_DNAT_PROBES[self.family])
            else:
                pairs.append(_PROBES[kind])
        return pairs

    def _locate(self, kind: str, probe_a: str, probe_b: str, a: bytes, b: bytes) -> _Slot | None:
        if kind in ("src", "dst"):
            return self._address(kind, probe_a, probe_b, a, b)
        if kind == "dnat":
            return self._dnat(probe_a, probe_b, a, b)
        encode = _ENCODERS[kind]
        # Search by the value's own bytes (strings without their padding). A value may be stored
        # twice (libxt_statistic copies the probability into the count the kernel reads).
        needle = probe_a.encode() if kind in ("comment", "recent-name", "jump") else encode(probe_a)
        found = _find_all(a, needle, self.header_size)
        expect_a, expect_b = encode(probe_a), encode(probe_b)
        if not found or any(
            a[o : o + len(expect_a)] != expect_a or b[o : o + len(expect_b)] != expect_b
            for o in found
        ):
            return None
        return _Slot(tuple((offset, encode) for offset in found))

    def _address(self, kind: str, probe_a: str, probe_b: str, a: bytes, b: bytes) -> _Slot | None:
        addr_offset, mask_offset = self.address_offsets[kind]
        for probe, entry in ((probe_a, a), (probe_b, b)):
            address, mask = _network(probe)
            if entry[addr_offset : addr_offset + len(address)] != address:
                return None
            if entry[mask_offset : mask_offset + len(mask)] != mask:
                return None
        return _Slot(((addr_offset, _network_address), (mask_offset, _network_mask)))

    def _dnat(self, probe_a: str, probe_b: str, a: bytes, b: bytes) -> _Slot | None:
        target_offset = struct.unpack_from("=H", a, self.target_offset_at)[0]
        parts: list[tuple[int, Encoder]] = []
        for part in (0, 1):  # address, then port
            needle_a = _split_destination(probe_a)[part]
            needle_b = _split_destination(probe_b)[part]
            found = _find_all(a, needle_a, target_offset)
            if not found or any(b[o : o + len(needle_b)] != needle_b for o in found):
                return None
            if len(found) != len(_find_all(b, needle_b, target_offset)):
                return None
            parts.extend((offset, _destination_part(part)) for offset in found)
        return _Slot(tuple(parts))


class EntryCompiler:
    """Turns IR rules into entries, through templates where a shape allows it."""

    def __init__(self, iptc: ModuleType, family: int) -> None:
        self.iptc = iptc
        self.family = family
        self.templates: dict[tuple[Any, ...], Template | None] = {}
        self.builder = TemplateBuilder(family, _layout(family))

    def entry(self, rule: Rule) -> bytes:
        """The rule's entry, as bytes."""
        buf = bytearray(MAX_ENTRY)
        size, _, _ = self.write_entry(rule, buf, 0)
        return bytes(buf[:size])

    def write_entry(self, rule: Rule, out: Buffer, at: int) -> tuple[int, int, str]:
        """Write the rule's entry at `at` of `out` (MAX_ENTRY bytes of room); its size, its
        target's offset and its target's name. No ctypes object is made (nothing waits for the
        cyclic garbage collector), and a template's entry is written where it goes."""
        key, values = shape_key(rule)
        try:
            template = self.templates[key]
        except KeyError:
            template = self.templates[key] = self._template(rule)
        if template is None:
            entry = self._built(rule)
            out[at : at + len(entry)] = entry
            (target_offset,) = struct.unpack_from("=H", entry, self.builder.target_offset_at)
            return len(entry), target_offset, target_label(entry, target_offset)
        template.fill_into(values, out, at)
        label = template.label if template.jump is None else values[template.jump]
        return len(template.entry), template.target_offset, label

    def _built(self, rule: Rule) -> bytes:
        """The entry python-iptables builds, a jump's target built as a verdict and then named
        after the chain (the name is all that tells a jump from a verdict before the compile)."""
        target = rule.target
        if target is None or not target.is_jump:
            return bytes(_finished(build_rule(self.iptc, self.family, rule)))
        verdict = replace(rule, target=Target("ACCEPT", goto=target.goto))
        entry = bytearray(_finished(build_rule(self.iptc, self.family, verdict)))
        (target_offset,) = struct.unpack_from("=H", entry, self.builder.target_offset_at)
        name = _padded(TARGET_NAME_SIZE)(target.name)
        entry[target_offset + 2 : target_offset + 2 + TARGET_NAME_SIZE] = name
        return bytes(entry)

    def _template(self, rule: Rule) -> Template | None:
        shape_a, split = split_rule(rule, self.family, 0)
        shape_b, _ = split_rule(rule, self.family, 1)
        try:
            entry_a = bytes(_finished(build_rule(self.iptc, self.family, shape_a)))
            entry_b = bytes(_finished(build_rule(self.iptc, self.family, shape_b)))
        except Exception:  # a shape python-iptables cannot build with probes: use the slow path
            return None
        return self.builder.build(split.kinds, entry_a, entry_b)


def target_label(entry: bytes, target_offset: int) -> str:
    """The name in an entry's target (xt_entry_target.u.user.name)."""
    name = entry[target_offset + 2 : target_offset + 2 + TARGET_NAME_SIZE]
    end = name.find(0)
    return (name if end < 0 else name[:end]).decode(errors="replace")


def build_rule(iptc: ModuleType, family: int, rule: Rule) -> Any:
    """A python-iptables Rule from the IR: the reference path every template is checked by."""
    r = iptc.Rule() if family == 4 else iptc.Rule6()
    if rule.src is not None:
        r.src = ("!" if rule.src_invert else "") + rule.src
    if rule.dst is not None:
        r.dst = ("!" if rule.dst_invert else "") + rule.dst
    if rule.in_iface is not None:
        r.in_interface = ("!" if rule.in_invert else "") + rule.in_iface
    if rule.out_iface is not None:
        r.out_interface = ("!" if rule.out_invert else "") + rule.out_iface
    if rule.protocol is not None:
        r.protocol = ("!" if rule.protocol_invert else "") + rule.protocol
    for match in rule.matches:
        m = r.create_match(match.name)
        for opt in match.opts:
            m.set_parameter(opt.name, ("!" if opt.invert else "") + opt.value)
    if rule.target is None:
        r.create_target("")  # the empty standard target: count and fall through
    else:
        t = r.create_target(rule.target.name, goto=rule.target.goto)
        for opt in rule.target.opts:
            t.set_parameter(opt.name, ("!" if opt.invert else "") + opt.value)
    return r


def _finished(rule: Any) -> ctypes.Array[ctypes.c_ubyte]:
    """A python-iptables Rule's entry after its extensions' final checks, as append_rule does."""
    rule.final_check()
    entry: ctypes.Array[ctypes.c_ubyte] = rule.rule
    return entry


@dataclass(frozen=True, slots=True)
class _Layout:
    header_size: int
    target_offset_at: int
    addresses: dict[str, tuple[int, int]]


def _layout(family: int) -> _Layout:
    """Where things are in ipt_entry (IPv4) or ip6t_entry (IPv6), from python-iptables' structs."""
    if family == 4:
        from iptc.ip4tc import ipt_entry as entry
        from iptc.ip4tc import ipt_ip as ip
    else:
        from iptc.ip6tc import ip6t_entry as entry
        from iptc.ip6tc import ip6t_ip6 as ip
    return _Layout(
        header_size=ctypes.sizeof(entry),
        target_offset_at=entry.target_offset.offset,
        addresses={
            "src": (ip.src.offset, ip.smsk.offset),
            "dst": (ip.dst.offset, ip.dmsk.offset),
        },
    )
