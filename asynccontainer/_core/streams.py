"""A container's piped stdio as anyio byte streams (`subprocess.PIPE`).

Pipes, not socket pairs, as `anyio.open_process` uses: a program inside
that opens /dev/stdout (a shell's `> /dev/stderr`) gets ENXIO on a socket.
The caller's end is non-blocking and waited on with `anyio.wait_readable` /
`wait_writable`, so a container that never writes (or never reads) blocks
only the task that waits on it, never the event loop.
"""

from __future__ import annotations

import errno
import os

import anyio
import anyio.abc

__all__ = ["PipeReceiveStream", "PipeSendStream"]

# What one receive() reads at most by default, as anyio's process streams.
_DEFAULT_MAX = 65536


class _PipeEnd:
    """The caller's end of a pipe: its fd, non-blocking, closed once."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd: int | None = fd

    def _open_fd(self) -> int:
        if self._fd is None:
            raise anyio.ClosedResourceError
        return self._fd

    def fileno(self) -> int:
        """Return the fd (for select and the like). Raises ClosedResourceError once closed."""
        return self._open_fd()

    def close_now(self) -> None:
        """Close the fd at once, with no checkpoint (a container garbage-collected)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    async def aclose(self) -> None:
        """Close the pipe; a task waiting on it gets ClosedResourceError. Never blocks."""
        fd, self._fd = self._fd, None
        if fd is not None:
            # Wakes a task in wait_readable/wait_writable on this fd first.
            anyio.notify_closing(fd)
            os.close(fd)
        await anyio.lowlevel.checkpoint()


class PipeReceiveStream(_PipeEnd, anyio.abc.ByteReceiveStream):
    """A container's stdout or stderr, as `Container.stdout` / `.stderr`."""

    async def receive(self, max_bytes: int = _DEFAULT_MAX) -> bytes:
        """Return the next bytes the container wrote (at most `max_bytes`).

        Raises:
            anyio.EndOfStream: the container closed its end (it exited).
            anyio.ClosedResourceError: this end was closed.

        Cancellation: nothing is lost; the bytes stay in the pipe.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            fd = self._open_fd()
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            if not data:
                raise anyio.EndOfStream
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return data


class PipeSendStream(_PipeEnd, anyio.abc.ByteSendStream):
    """A container's stdin, as `Container.stdin`."""

    async def send(self, item: bytes) -> None:
        """Write all of `item`, waiting while the pipe is full.

        Raises:
            anyio.BrokenResourceError: the container closed its end (it exited).
            anyio.ClosedResourceError: this end was closed.

        Cancellation: what was written before stays written; the rest is not.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(item)
        while view:
            fd = self._open_fd()
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                await anyio.wait_writable(fd)
                continue
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    raise anyio.BrokenResourceError from exc
                raise
            view = view[written:]
        await anyio.lowlevel.cancel_shielded_checkpoint()
