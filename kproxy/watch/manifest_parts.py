"""A large multi-document manifest file parsed in parts, one process per CPU, for the commands
that read their manifests once (`sync --once`, `dump`, `trace`).

libyaml makes a Python object for every event and node it reads, so a 10,000-service file takes
seconds of one CPU. The file is cut at document start lines (`---` at the start of a line: YAML
lets no document's content begin a line so), which leaves each document whole in one part. The
process parses the first part itself while a forked child parses each other part and writes its
documents, pickled one by one, to a memory file; then it reads them back in order. The documents
are the ones a single parse of the file yields, in the same order.

Anything unusual reads the file as one stream, the way it always was: a small file, a single
CPU, a `%` directive line (it would bind to the document after the cut), a process running
other threads (a fork copies only the caller's thread, and any lock another one held stays
locked in the child). When a part fails (a parse error, text that does not decode, a child that
dies), the documents already yielded are kept and the file is read again as one stream from the
start, skipping them: its error is the one a single parse raises, at the same line.
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import pickle
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kproxy.watch.manifest_yaml import Readable, load_documents

# Below this many bytes a part costs more in fork and pickle than it saves.
MIN_PART_BYTES = 1 << 20
MAX_PARTS = 8
_LINE_ENDS = b" \t\r\n"


class _PartFailed(Exception):
    """A part that did not parse: the file is read again as one stream."""


def part_count(size: int) -> int:
    """How many parts a file of `size` bytes is parsed in: one per CPU this process may run on,
    none smaller than MIN_PART_BYTES; 1 where another thread runs."""
    if threading.active_count() > 1:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), MAX_PARTS, size // MIN_PART_BYTES))


def cut_points(data: bytes | mmap.mmap, parts: int) -> list[int]:
    """The byte offsets where parts begin: 0, then for each other part the first document start
    line at or after its share of the file. Fewer where documents are few; only [0] when the
    file holds a directive line."""
    if data[:1] == b"%" or data.find(b"\n%") >= 0:
        return [0]
    size = len(data)
    cuts = [0]
    for k in range(1, parts):
        # From the byte before this part's share, and past the last cut's own `---`.
        at = max(size * k // parts - 1, cuts[-1], 0)
        while (at := data.find(b"\n---", at)) >= 0:
            after = data[at + 4 : at + 5]
            if not after or after in _LINE_ENDS:
                break
            at += 4
        if at < 0:
            break
        cuts.append(at + 1)
    return cuts


@dataclass
class _Part:
    """The bytes [start, end) of the file; with `pid`, a child parses them into `out`."""

    start: int
    end: int
    pid: int = 0
    out: int = -1


def split_documents(
    fd: int, encoding: str, whole: Readable, parts: int | None = None
) -> Iterator[Any]:
    """The documents of the manifest file open as `fd` (text in `encoding`), as
    load_documents(`whole`) yields them; `whole` is the same file as a text stream, read only
    when the file is read as one stream. `parts` overrides part_count (tests)."""
    size = os.fstat(fd).st_size
    count = part_count(size) if parts is None else parts
    cuts = [0]
    if count > 1 and size > 0:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
            cuts = cut_points(data, count)
    if len(cuts) == 1:
        yield from load_documents(whole)
        return
    ranges = [_Part(start, end) for start, end in zip(cuts, [*cuts[1:], size], strict=True)]
    yielded = 0
    failed = False
    try:
        for part in ranges[1:]:
            _fork_parser(fd, encoding, part)
        for part in ranges:
            for doc in _read_part(fd, encoding, part):
                yield doc
                yielded += 1
    except _PartFailed:
        failed = True
    finally:
        for part in ranges:
            _stop(part)
    if failed:
        yield from itertools.islice(load_documents(whole), yielded, None)


def _text(fd: int, encoding: str, part: _Part) -> io.TextIOWrapper:
    """The part as a text stream read as the whole file's is (universal newlines)."""
    return io.TextIOWrapper(io.BytesIO(os.pread(fd, part.end - part.start, part.start)), encoding)


def _fork_parser(fd: int, encoding: str, part: _Part) -> None:
    try:
        part.out = os.memfd_create("kproxy-manifest-part", os.MFD_CLOEXEC)
        part.pid = os.fork()
    except OSError as exc:  # out of processes or descriptors: one stream, then
        raise _PartFailed from exc
    if part.pid:
        return
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        with open(part.out, "wb", closefd=False) as out:
            for doc in load_documents(_text(fd, encoding, part)):
                pickle.dump(doc, out, pickle.HIGHEST_PROTOCOL)
        status = 0
    finally:
        os._exit(status)


def _read_part(fd: int, encoding: str, part: _Part) -> Iterator[Any]:
    if not part.pid:  # this process's own part
        try:
            yield from load_documents(_text(fd, encoding, part))
        except Exception as exc:
            raise _PartFailed from exc
        return
    _, status = os.waitpid(part.pid, 0)
    part.pid = 0
    if os.waitstatus_to_exitcode(status) != 0:
        raise _PartFailed
    with open(part.out, "rb", closefd=False) as given:
        given.seek(0)
        while True:
            try:  # (an unpickler for each: its memo would keep every document alive)
                doc = pickle.load(given)
            except EOFError:
                return
            except Exception as exc:  # a memory file cut short
                raise _PartFailed from exc
            yield doc


def _stop(part: _Part) -> None:
    """The part's child killed and reaped if it still runs; its memory file closed."""
    if part.pid:
        os.kill(part.pid, signal.SIGKILL)  # (unreaped, it cannot be gone)
        os.waitpid(part.pid, 0)
        part.pid = 0
    if part.out >= 0:
        os.close(part.out)
        part.out = -1
