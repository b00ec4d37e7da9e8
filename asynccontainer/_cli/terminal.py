"""A pty between the user's terminal and a container, as `docker run -t` and ssh give.

The container gets the pty's slave as its stdio and controlling terminal,
in a session of its own (`run_container(new_session=True)`), so job
control, Ctrl-C and the window size work inside, and nothing inside can
reach the user's terminal itself. The user's terminal is put in raw mode
and the bytes are relayed both ways until the container's side closes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import termios
import tty
from collections.abc import Iterator

import anyio

__all__ = ["PseudoTerminal"]


def _copy_window_size(source: int, target: int) -> None:
    try:
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(target, termios.TIOCSWINSZ, size)
    except OSError:
        pass


class PseudoTerminal:
    """A pty pair whose slave the container uses, relayed to the caller's terminal (fd 0, 1)."""

    def __init__(self, user_in: int = 0, user_out: int = 1) -> None:
        self.user_in = user_in
        self.user_out = user_out
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        self.drained = anyio.Event()
        """Set once everything the container wrote has been relayed."""
        _copy_window_size(user_in, self.slave)

    def close_slave(self) -> None:
        """Close the caller's copy of the slave, once the container has its own."""
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        """Close both ends."""
        self.close_slave()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    @contextlib.contextmanager
    def raw_mode(self) -> Iterator[None]:
        """Put the user's terminal in raw mode: every key goes to the container."""
        saved = termios.tcgetattr(self.user_in)
        tty.setraw(self.user_in)
        try:
            yield
        finally:
            termios.tcsetattr(self.user_in, termios.TCSAFLUSH, saved)

    async def relay(self) -> None:
        """Relay both ways until the container's side of the pty is closed."""
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._keyboard)
                group.start_soon(self._window_size)
                await self._screen()
                group.cancel_scope.cancel()
        finally:
            self.drained.set()

    async def _screen(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                await anyio.wait_readable(self.master)
                continue
            except OSError as exc:
                # EIO: every process of the container closed the slave.
                if exc.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            _write_all(self.user_out, data)

    async def _keyboard(self) -> None:
        while True:
            await anyio.wait_readable(self.user_in)
            data = os.read(self.user_in, 4096)
            if not data:
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.master, view) :]
                except BlockingIOError:
                    await anyio.wait_writable(self.master)

    async def _window_size(self) -> None:
        with anyio.open_signal_receiver(signal.SIGWINCH) as changes:
            async for _ in changes:
                _copy_window_size(self.user_in, self.master)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
