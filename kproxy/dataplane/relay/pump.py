"""One direction of a TCP relay: bytes from one socket to another, in the kernel when possible.

os.splice through a pipe moves the bytes socket -> pipe -> socket without copying them into
Python objects; the plain recv/send loop is the fallback where splice is missing or refused."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from collections.abc import Callable

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
HAS_SPLICE = hasattr(os, "splice")
_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAS_SPLICE else 0

Count = Callable[[int], None]


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Until `fd` is readable (or writable): one-shot selector registration."""
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, ready)
    try:
        await fut
    finally:
        remove(fd)


def _open_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe: its read end, write end and capacity in bytes."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # A bigger pipe means fewer wakeups per megabyte; the default is the fallback (64 KiB,
        # or less once the user is over pipe-user-pages-soft).
        try:
            size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w, size


class _SpliceDirection:
    """Callbacks on the selector instead of one future per wakeup: the reader stays registered
    while bytes flow, which halves the per-request cost against awaiting readiness each time."""

    def __init__(self, src: socket.socket, dst: socket.socket, count: Count) -> None:
        self._loop = asyncio.get_running_loop()
        self._src, self._dst = src.fileno(), dst.fileno()
        self._count = count
        self._pipe_r, self._pipe_w, size = _open_pipe()
        # A splice shorter than this emptied src; a full one may have left bytes behind.
        self._capacity = min(CHUNK, size)
        self._pending = 0
        self.done: asyncio.Future[None] = self._loop.create_future()

    def start(self) -> None:
        self._loop.add_reader(self._src, self._on_readable)

    def close(self) -> None:
        self._loop.remove_reader(self._src)
        self._loop.remove_writer(self._dst)
        os.close(self._pipe_r)
        os.close(self._pipe_w)

    def _finish(self, error: OSError | None) -> None:
        self._loop.remove_reader(self._src)
        self._loop.remove_writer(self._dst)
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)

    def _drain(self) -> bool:
        """Pipe -> dst; False when dst is full (the writer callback takes over)."""
        while self._pending:
            try:
                n = os.splice(self._pipe_r, self._dst, self._pending, flags=_FLAGS)
            except BlockingIOError:
                self._loop.remove_reader(self._src)
                self._loop.add_writer(self._dst, self._on_writable)
                return False
            self._pending -= n
            self._count(n)
        return True

    def _on_readable(self) -> None:
        try:
            # A bounded number of chunks per wakeup keeps one bulk flow from starving the others.
            for _ in range(8):
                if not self._drain():
                    return
                try:
                    # The pipe is empty here, so EAGAIN means src has nothing yet.
                    n = os.splice(self._src, self._pipe_w, CHUNK, flags=_FLAGS)
                except BlockingIOError:
                    return
                if n == 0:
                    self._finish(None)
                    return
                self._pending = n
                if n < self._capacity:
                    # Nothing left to read now: skip the splice that would only fail with
                    # EAGAIN (a syscall and an exception per message on request/reply traffic).
                    # The reader stays registered, so bytes arriving meanwhile wake us again.
                    break
            self._drain()
        except OSError as exc:
            self._finish(exc)

    def _on_writable(self) -> None:
        try:
            if self._drain():
                self._loop.remove_writer(self._dst)
                self._loop.add_reader(self._src, self._on_readable)
        except OSError as exc:
            self._finish(exc)


async def splice_pump(src: socket.socket, dst: socket.socket, count: Count) -> None:
    """Move bytes until src reaches EOF (returns) or either side fails (raises OSError)."""
    try:
        direction = _SpliceDirection(src, dst, count)
    except OSError:
        # No pipe to be had (EMFILE): this connection still works, through a buffer.
        await copy_pump(src, dst, count)
        return
    try:
        direction.start()
        await direction.done
    finally:
        direction.close()


async def copy_pump(src: socket.socket, dst: socket.socket, count: Count) -> None:
    """The fallback: the same contract as splice_pump through a user-space buffer."""
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.sock_recv(src, 1 << 18)
        if not data:
            return
        await loop.sock_sendall(dst, data)
        count(len(data))
