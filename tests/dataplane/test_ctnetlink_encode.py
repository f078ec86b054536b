"""ctnetlink requests as pyroute2 encodes them: a delete spliced from a template is what pyroute2
encodes for the same flow in one go, and a dumped entry's fields are read where they are."""

from __future__ import annotations

import socket
import struct

import pytest

from kproxy.dataplane.ctnetlink import (
    CT_GET,
    NLM_F_DUMP,
    decode_flow,
    delete_attrs,
    delete_template,
    encode_request,
    filter_attrs,
)

FLOWS = {
    4: ("10.0.0.7", "10.96.0.10", "10.244.1.5"),
    6: ("fd00:10::7", "fd00:96::10", "fd00:244::5"),
}


def attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("<HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def kernel_entry(family: int, zone: bytes) -> bytes:
    """A dumped entry as the kernel lays it out (nested flags set, fields it adds)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    src_kind = 1 if family == 4 else 3

    def tuple_(src: str, dst: str, sport: int, dport: int) -> bytes:
        ip = attr(src_kind, socket.inet_pton(af, src)) + attr(
            src_kind + 1, socket.inet_pton(af, dst)
        )
        proto = attr(1, b"\x11") + attr(2, struct.pack(">H", sport))
        proto += attr(3, struct.pack(">H", dport))
        return attr(1 | 0x8000, ip) + attr(2 | 0x8000, proto)

    client, vip, endpoint = FLOWS[family]
    entry = attr(1 | 0x8000, tuple_(client, vip, 40000, 53))
    entry += attr(2 | 0x8000, tuple_(endpoint, client, 53, 40000))
    entry += attr(3, struct.pack(">I", 8)) + attr(7, struct.pack(">I", 30))
    entry += attr(12, struct.pack(">I", 12345))
    return entry + (attr(18, zone) if zone else b"")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("zone", [b"", b"\x00\x07"])
def test_a_dumped_flows_delete_is_pyroute2s_encoding_of_its_tuple_id_and_zone(
    family: int, zone: bytes
) -> None:
    entry = kernel_entry(family, zone)
    flow = decode_flow(entry, 0, len(entry), family)
    assert flow is not None
    client, vip, endpoint = FLOWS[family]
    assert (flow.dst, flow.dport, flow.reply_src) == (vip, 53, endpoint)
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    values = [socket.inet_pton(af, client), socket.inet_pton(af, vip), b"\x9c\x40", b"\x00\x35"]
    values += [struct.pack(">I", 12345), *((zone,) if zone else ())]
    assert flow.ref == delete_attrs(family, *values)
    assert delete_template(family, bool(zone)).fill(*values) == flow.ref


def test_an_entry_that_is_not_udp_or_lacks_its_id_is_not_read() -> None:
    entry = kernel_entry(4, b"")
    tcp = entry.replace(b"\x05\x00\x01\x00\x11", b"\x05\x00\x01\x00\x06")
    assert decode_flow(tcp, 0, len(tcp), 4) is None
    no_id = entry.replace(attr(12, struct.pack(">I", 12345)), b"")
    assert decode_flow(no_id, 0, len(no_id), 4) is None


def test_a_filtered_dump_names_udp_the_port_and_the_ipv4_destination() -> None:
    message = encode_request(CT_GET, NLM_F_DUMP, 9, 4, filter_attrs(4, 53, "10.96.0.10"))
    length, kind, flags, seq = struct.unpack_from("<IHHI", message)
    assert (length, kind, flags, seq) == (len(message), 0x101, 0x301, 9)
    assert message[16] == socket.AF_INET
    assert socket.inet_aton("10.96.0.10") in message and b"\x00\x35" in message
    # CTA_FILTER (25, nested) with CTA_FILTER_ORIG_FLAGS: destination address, protocol, port
    assert attr(25 | 0x8000, attr(1, struct.pack("<I", 0b101010))) in message
