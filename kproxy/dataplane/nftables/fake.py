"""An in-memory nf_tables for unit tests, behind the real NftNetlink: kproxy's own batch framing,
ack handling, dump filtering and encodings run unchanged, and only the socket is fake. It holds
tables, chains, rules, sets and elements as the bytes the messages carried (that those are the
kernel's canonical form is encode.py's business, checked against the kernel elsewhere), applies
each batch as one transaction, and answers dumps and gets with the bytes the kernel dumps
(fake_dumps.py; checked against a recorded kernel dump in tests/nftables/test_nftables_fake.py).

Refused (fake_ruleset.py), with the kernel's errno and nothing of the batch applied, each case
checked against a real kernel (tests/nftables/nft_cases.py): deleting a missing table, chain, rule, set or
element, a rule in a missing table or chain, a jump or goto (in a rule or a verdict map's
element) to a missing chain, a lookup of a missing set (ENOENT); a jump or goto to a base chain
(EOPNOTSUPP); deleting a chain a rule or an element still jumps to, or a set a rule still looks
up (EBUSY); adding an existing table, chain, set or element with NLM_F_EXCL, an existing set
with another definition or an existing element with other data (EEXIST); an existing chain
again with another hook (EOPNOTSUPP); an element whose key is not the set's key length (the kernel
knows no key types, only lengths), a verdict map's element without a verdict or a plain set's
element with one (EINVAL); a loop of jumps a base chain reaches (EMLINK, as the kernel answers).

Like the kernel, a chain dump answers with the chains of every table of the family, whatever
table it names (kproxy filters), and a rule dump of a missing chain with nothing; a commit bumps
the ruleset generation and tells monitors (FakeNftMonitor, which tests put in NftMonitor's place)
the tables it touched and the committing socket's port. `refuse_commit` makes a later commit
fail, as the kernel's can for reasons of its own (memory)."""

from __future__ import annotations

import copy
import errno
import struct
import threading
from collections import deque
from collections.abc import Iterator

from kproxy.dataplane.nftables.fake_dumps import answer_dump, answer_get
from kproxy.dataplane.nftables.fake_ruleset import (
    FakeTable,
    Refused,
    Tables,
    execute,
    has_loop,
    text,
)
from kproxy.dataplane.nftables.netlink import (
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    READ_SIZE,
    Message,
    NftNetlink,
    iter_attrs,
    iter_messages,
    nfgen_message,
)

DUMP_DATAGRAM = 32 << 10  # what the kernel puts in one datagram of a dump, at most


class FakeNfTables:
    """The ruleset of one fake network namespace; sockets (FakeNftNetlink) and monitors
    (FakeNftMonitor) attach to it. `refuse_commit` makes the kernel refuse a later batch."""

    def __init__(self) -> None:
        self.tables: Tables = {}
        self.generation = 1
        self.commits = 0
        self.lock = threading.Lock()
        self._monitors: list[FakeNftMonitor] = []
        self._ports = 100
        self._refusals: dict[int, int] = {}  # batches from now -> errno

    def new_port(self) -> int:
        self._ports += 1
        return self._ports

    def socket(self) -> FakeNftNetlink:
        return FakeNftNetlink(self)

    def monitor(self) -> FakeNftMonitor:
        monitor = FakeNftMonitor()
        self._monitors.append(monitor)
        return monitor

    def lose_notifications(self) -> None:
        """As when a monitor's socket overflows: its next read can tell nothing."""
        for monitor in self._monitors:
            monitor.lost = True

    def refuse_commit(self, code: int = errno.ENOMEM, after: int = 0) -> None:
        """Refuse the batch that comes after `after` more accepted ones."""
        self._refusals[after] = code

    def table(self, family: int, name: str) -> FakeTable | None:
        return self.tables.get((family, name))

    def apply(self, messages: list[Message], port: int) -> tuple[int, int]:
        """Apply a batch's messages as one transaction: (0, 0), or (errno, index of the
        message refused; -1 for the commit)."""
        with self.lock:
            staged = copy.deepcopy(self.tables)
            for index, msg in enumerate(messages):
                try:
                    execute(staged, msg)
                except Refused as exc:
                    return exc.code, index
            refusal = self._refusals.pop(0, None)
            self._refusals = {k - 1: v for k, v in self._refusals.items()}
            if refusal is not None:
                return refusal, -1
            touched = {(m.family, text(dict(iter_attrs(m.attrs)).get(1, b""))) for m in messages}
            for key in touched:
                if key in staged and has_loop(staged[key]):
                    return errno.EMLINK, -1  # the kernel's answer to a loop (its jump stack)
            self.tables = staged
            self.generation += 1
            self.commits += 1
            for monitor in self._monitors:
                monitor.heard.extend((port, family, name) for family, name in touched)
            return 0, 0


# --- the socket ----------------------------------------------------------------------------


def _error(seq: int, code: int) -> bytes:
    """An NLMSG_ERROR (with NETLINK_CAP_ACK: the request's header only)."""
    return struct.pack("<IHHII", 36, NLMSG_ERROR, 0, seq, 0) + struct.pack("<i", -code) + bytes(16)


def _done(seq: int) -> bytes:
    return struct.pack("<IHHII", 20, NLMSG_DONE, NLM_F_MULTI, seq, 0) + bytes(4)


class FakeSocket:
    """What NftNetlink asks of its socket: a send is answered by datagrams to read."""

    def __init__(self, nft: FakeNfTables) -> None:
        self.nft = nft
        self.port = nft.new_port()
        self.replies: deque[bytes] = deque()

    def setsockopt(self, *args: object) -> None:
        pass

    def getsockname(self) -> tuple[int, int]:
        return self.port, 0

    def close(self) -> None:
        pass

    def recv_into(self, buffer: bytearray) -> int:
        if not self.replies:
            raise BlockingIOError(errno.EAGAIN, "nothing to read")  # a real one would hang
        data = self.replies.popleft()
        buffer[: len(data)] = data
        return len(data)

    def send(self, data: bytes) -> int:
        messages = list(iter_messages(bytes(data)))
        if messages and messages[0].type == NFNL_MSG_BATCH_BEGIN:
            self._batch(messages)
        else:
            for msg in messages:
                self._request(msg)
        return len(data)

    def _batch(self, messages: list[Message]) -> None:
        begin = messages[0].seq
        body = [m for m in messages[1:] if m.type != NFNL_MSG_BATCH_END]
        code, index = self.nft.apply(body, self.port)
        if code and index < 0:
            self.replies.append(_error(begin, code))
            return
        if code:
            self.replies.append(_error(body[index].seq, code))
        acked = [m for m in body if m.flags & 0x4 and not (code and m is body[index])]
        self.replies.extend(_error(m.seq, 0) for m in acked)

    def _request(self, msg: Message) -> None:
        kind, attrs = msg.type & 0xFF, dict(iter_attrs(msg.attrs))
        subsys = NFNL_SUBSYS_NFTABLES << 8
        try:
            with self.nft.lock:
                if msg.flags & NLM_F_DUMP == NLM_F_DUMP:
                    answers = answer_dump(self.nft.tables, kind, msg.family, attrs)
                    self._datagrams(
                        nfgen_message(subsys | (kind - 1), NLM_F_MULTI, msg.seq, fam, body)
                        for fam, body in answers
                    )
                    self.replies.append(_done(msg.seq))
                else:
                    body = answer_get(self.nft.tables, self.nft.generation, kind, msg.family, attrs)
                    self.replies.append(
                        nfgen_message(subsys | (kind - 1), 0, msg.seq, msg.family, body)
                    )
        except Refused as exc:
            self.replies.append(_error(msg.seq, exc.code))

    def _datagrams(self, messages: Iterator[bytes]) -> None:
        """A dump's messages in datagrams of at most DUMP_DATAGRAM bytes, as the kernel sends."""
        datagram = b""
        for message in messages:
            if datagram and len(datagram) + len(message) > DUMP_DATAGRAM:
                self.replies.append(datagram)
                datagram = b""
            datagram += message
        if datagram:
            self.replies.append(datagram)


class FakeNftNetlink(NftNetlink):
    """NftNetlink on a FakeSocket attached to `nft` (each one a program of its own: its own
    port, which the notifications of its commits carry)."""

    def __init__(self, nft: FakeNfTables) -> None:
        self.sock = FakeSocket(nft)  # type: ignore[assignment]
        self._seq = 1
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self.last_commit_seconds = 0.0
        self.kernel_seconds = 0.0


class FakeNftMonitor:
    """NftMonitor's surface, told of every commit to the FakeNfTables it came from."""

    def __init__(self) -> None:
        self.heard: list[tuple[int, int, str]] = []  # port, family, table
        self.lost = False

    def close(self) -> None:
        pass

    def changed_tables(self, own_port: int) -> set[tuple[int, str]] | None:
        heard, self.heard = self.heard, []
        lost, self.lost = self.lost, False
        if lost:
            return None
        return {(family, table) for port, family, table in heard if port != own_port}
