"""One direction of a TCP relay: bytes from one socket to another, in the kernel when possible.

os.splice through a pipe moves the bytes socket -> pipe -> socket without copying them into
Python objects; the plain recv/send loop is the fallback where splice is missing or refused."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Callable

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
HAS_SPLICE = hasattr(os, "splice")

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


def _open_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # A bigger pipe means fewer wakeups per megabyte; the default 64 KiB is the fallback.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


async def _drain(loop: asyncio.AbstractEventLoop, pipe_r: int, dst: int, pending: int) -> None:
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    while pending:
        try:
            pending -= os.splice(pipe_r, dst, pending, flags=flags)
        except BlockingIOError:
            await _wait(loop, dst, write=True)


async def splice_pump(src: socket.socket, dst: socket.socket, count: Count) -> None:
    """Move bytes until src reaches EOF (returns) or either side fails (raises OSError)."""
    loop = asyncio.get_running_loop()
    pipe_r, pipe_w = _open_pipe()
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    try:
        while True:
            try:
                # The pipe is always drained first, so EAGAIN here means src has nothing yet.
                n = os.splice(src.fileno(), pipe_w, CHUNK, flags=flags)
            except BlockingIOError:
                await _wait(loop, src.fileno(), write=False)
                continue
            if n == 0:
                return
            await _drain(loop, pipe_r, dst.fileno(), n)
            count(n)
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


async def copy_pump(src: socket.socket, dst: socket.socket, count: Count) -> None:
    """The fallback: the same contract as splice_pump through a user-space buffer."""
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.sock_recv(src, 1 << 18)
        if not data:
            return
        await loop.sock_sendall(dst, data)
        count(len(data))


def splice_works(sock: socket.socket) -> bool:
    """Whether this kernel splices from this kind of socket (a zero-length probe)."""
    if not HAS_SPLICE:
        return False
    r, w = _open_pipe()
    try:
        os.splice(sock.fileno(), w, 0, flags=os.SPLICE_F_NONBLOCK)
    except BlockingIOError:
        return True
    except OSError as exc:
        return exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
    finally:
        os.close(r)
        os.close(w)
    return True
