"""A plain nfnetlink socket for nf_tables: one batch transaction per send, dumps filtered to one
table (by kproxy, whatever the kernel returns), the ruleset generation.

What it sends is encoded by pyroute2's nftables message classes (encode.py). The socket is a plain
AF_NETLINK one: pyroute2's NFTSocket reads through an asyncio transport that decodes every message
it receives into attribute objects (measured: 100 us a rule, about 20 s for the 200,000 rules of
a 10,000-service table, where kproxy compares bytes), and its commit does not wait for the
kernel's verdict on the batch, which kproxy must know."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kproxy.errors import DataplaneError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNLGRP_NFTABLES = 7  # the multicast group of nf_tables' change notifications
NFT_MSG_NEWGEN = 15
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLA_F_NESTED = 0x8000
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10
RCVBUF = 16 << 20
MONITOR_RCVBUF = 4 << 20
# What one read takes: the kernel sends a dump in datagrams of at most 32 KB, an ack or an error
# (with NETLINK_CAP_ACK) in a few bytes, a notification in one page or so.
READ_SIZE = 1 << 20

_HEADER = struct.Struct("<IHHII")
_NFGEN = struct.Struct("<BBH")  # family, version, res_id (big-endian, written as such)
_MESSAGE_HEAD = struct.Struct("<IHHIIBBH")  # both, as nfgen_message writes them


class NetlinkError(OSError):
    """The kernel refused a message of a batch (or the whole commit)."""

    def __init__(self, code: int, seq: int, what: str) -> None:
        super().__init__(code, f"{os.strerror(code)} ({what})")
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    flags: int
    seq: int
    payload: bytes  # after the netlink header
    port: int = 0  # the sender's netlink port (in a notification: whose change it was)

    @property
    def family(self) -> int:
        return self.payload[0] if self.payload else 0

    @property
    def attrs(self) -> bytes:
        """The attributes after the nfgenmsg header."""
        return self.payload[4:]

    @property
    def error(self) -> int:
        """An NLMSG_ERROR's errno (0 for an ack)."""
        return -int(struct.unpack_from("<i", self.payload, 0)[0])


def nfgen_message(msg_type: int, flags: int, seq: int, family: int, attrs: bytes) -> bytes:
    length = 20 + len(attrs)
    return (
        _HEADER.pack(length, (NFNL_SUBSYS_NFTABLES << 8) | msg_type, flags, seq, 0)
        + _NFGEN.pack(family, 0, 0)
        + attrs
    )


def _batch_marker(msg_type: int, seq: int) -> bytes:
    return _HEADER.pack(20, msg_type, NLM_F_REQUEST, seq, 0) + struct.pack(
        "<BBH", 0, 0, socket.htons(NFNL_SUBSYS_NFTABLES)
    )


def iter_attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in `data`, flags stripped from the type."""
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("<HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def iter_messages(data: bytes) -> Iterator[Message]:
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type, flags, seq, port = _HEADER.unpack_from(data, offset)
        if length < 16:
            break
        yield Message(msg_type, flags, seq, data[offset + 16 : offset + length], port)
        offset += (length + 3) & ~3


def answers(msg: Message, family: int, request: bytes) -> bool:
    """Whether a dump's answer is about what the request named: the request's family (unless it
    asked for every family) and each of the request's attributes with the same value (the
    table's name, and the chain's or set's where it names one). The kernel filters some dumps
    (a rule dump by table and chain) but not others (a chain dump returns the chains of every
    table of the family, iptables-nft's among them): kproxy never acts on what it did not ask
    for."""
    payload = msg.payload
    if family and (not payload or payload[0] != family):
        return False
    if payload.startswith(request, 4):  # the kernel puts the names first: nothing to parse
        return True
    have = dict(iter_attrs(msg.attrs))
    return all(have.get(kind) == value for kind, value in iter_attrs(request))


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch transaction, ready to send: its bytes and its first and last sequence."""

    data: bytearray
    begin: int
    last: int


class NftNetlink:
    """One NETLINK_NETFILTER socket; not thread-safe (the sync loop is its only user)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            self.sock.close()
            raise DataplaneError(
                "kproxy must run as root (CAP_NET_ADMIN) to program netfilter tables"
            ) from None
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without the message
        self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self._seq = 1
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self.last_commit_seconds = 0.0  # the kernel's part of the last transaction
        self.kernel_seconds = 0.0  # and of all of them

    @property
    def port(self) -> int:
        """This socket's netlink port: what the kernel's notifications of its changes carry."""
        return int(self.sock.getsockname()[0])

    def close(self) -> None:
        self.sock.close()

    def _receive(self) -> bytes:
        """One datagram, read into a buffer kept for the purpose (a fresh 16 MB buffer for every
        read of a small reply costs more than the reply)."""
        size = self.sock.recv_into(self._buffer)
        return bytes(self._view[:size])

    def __enter__(self) -> NftNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def transact(self, messages: Iterable[tuple[int, int, int, bytes]]) -> bool:
        """Send (type, flags, family, attrs) messages as one batch transaction and wait for the
        kernel's verdict on it: nothing of it applies unless all of it does. False when there
        was nothing to send."""
        batch = self.batch(messages)
        if batch is None:
            return False
        self.commit(batch)
        return True

    def batch(self, messages: Iterable[tuple[int, int, int, bytes]]) -> Batch | None:
        """The messages as one batch, built in one buffer as they come (no list of them is
        kept); None when there are none. Building is Python's work, `commit` the kernel's: one
        thread may build the next batch while another commits this one."""
        begin = self.next_seq()
        buf = bytearray(_batch_marker(NFNL_MSG_BATCH_BEGIN, begin))
        last_offset = -1
        seq = self._seq
        pack = _MESSAGE_HEAD.pack
        for msg_type, flags, family, attrs in messages:
            seq += 1
            last_offset = len(buf)
            # nfgen_message, inlined: this runs once per rule of a table written afresh
            buf += pack(
                20 + len(attrs),
                (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
                flags | NLM_F_REQUEST,
                seq,
                0,
                family,
                0,
                0,
            )
            buf += attrs
        self._seq = last = seq
        if last_offset < 0:
            return None
        # Only the last message asks for an ack: it comes after every error of the batch.
        flags_at = last_offset + 6
        flags = struct.unpack_from("<H", buf, flags_at)[0]
        struct.pack_into("<H", buf, flags_at, flags | NLM_F_ACK)
        buf += _batch_marker(NFNL_MSG_BATCH_END, self.next_seq())
        return Batch(buf, begin, last)

    def commit(self, batch: Batch) -> None:
        """Send a batch and wait for the kernel's verdict (raises NetlinkError if refused).
        The kernel works through the batch inside the send, with Python's lock released."""
        self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(batch.data) + 65536)
        started = time.perf_counter()
        self.sock.send(batch.data)
        self._wait_ack(batch.begin, batch.last)
        self.last_commit_seconds = time.perf_counter() - started
        self.kernel_seconds += self.last_commit_seconds

    def _wait_ack(self, begin: int, last: int) -> None:
        first_error: NetlinkError | None = None
        while True:
            data = self._receive()
            for msg in iter_messages(data):
                if msg.type != NLMSG_ERROR:
                    continue
                code = msg.error
                if code and first_error is None:
                    first_error = NetlinkError(code, msg.seq, f"message {msg.seq - begin}")
                # The last message's ack (or error) comes after every other error; a failed
                # commit is reported against the batch's first message.
                if msg.seq in (last, begin):
                    if first_error is not None:
                        raise first_error
                    return

    def dump(self, msg_type: int, family: int, attrs: bytes) -> list[Message]:
        """A dump of what `attrs` names (e.g. the chains of one table, the rules of one chain),
        and only that: every answer the kernel sends is checked against the request."""
        seq = self.next_seq()
        self.sock.send(nfgen_message(msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, family, attrs))
        out: list[Message] = []
        while True:
            data = self._receive()
            for msg in iter_messages(data):
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_DONE:
                    return out
                if msg.type == NLMSG_ERROR:
                    code = msg.error
                    if code == 0:
                        return out
                    if code == errno.EINTR:
                        return self.dump(msg_type, family, attrs)  # the ruleset changed mid-dump
                    raise NetlinkError(code, seq, "dump")
                if answers(msg, family, attrs):
                    out.append(msg)

    def request(self, msg_type: int, family: int, attrs: bytes) -> Message | None:
        """One get request (e.g. the generation); None when the object does not exist."""
        seq = self.next_seq()
        self.sock.send(nfgen_message(msg_type, NLM_F_REQUEST, seq, family, attrs))
        while True:
            data = self._receive()
            for msg in iter_messages(data):
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_ERROR:
                    code = msg.error
                    if code == errno.ENOENT:
                        return None
                    raise NetlinkError(code, seq, "get")
                return msg


class NftMonitor:
    """A socket subscribed to nf_tables' change notifications (what `nft monitor` reads), so
    that kproxy can tell whose tables another program's commit changed. Never blocks."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, MONITOR_RCVBUF)
        self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        self.sock.setblocking(False)
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)

    def close(self) -> None:
        self.sock.close()

    def changed_tables(self, own_port: int) -> set[tuple[int, str]] | None:
        """(family, table) of every change notified since the last call, but those made through
        `own_port`; None when notifications were lost (the socket overflowed), so that nothing
        can be said."""
        changed: set[tuple[int, str]] = set()
        lost = False
        while True:
            try:
                size = self.sock.recv_into(self._buffer)
            except BlockingIOError:
                return None if lost else changed
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                lost = True
                continue
            for msg in iter_messages(bytes(self._view[:size])):
                if msg.port == own_port or msg.type >> 8 != NFNL_SUBSYS_NFTABLES:
                    continue
                if msg.type & 0xFF == NFT_MSG_NEWGEN:
                    continue  # the end of a commit: no table of its own
                changed.add((msg.family, _first_name(msg.attrs)))


def _first_name(attrs: bytes) -> str:
    """The table an nf_tables notification is about: its attribute 1 (a table's name, or the
    table of a chain, rule, set, element list, object or flowtable)."""
    for kind, value in iter_attrs(attrs):
        if kind == 1:
            return value.rstrip(b"\0").decode("utf-8", "replace")
    return ""
