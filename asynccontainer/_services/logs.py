"""A service's log: its file prepared on the host, and the lines of its output pipe.

The service's stdout and stderr are one pipe; `LineLogger` reads it in the
caller and writes each line, timestamped, to the log file (or to the
`logging` module).
"""

from __future__ import annotations

import logging
import os
import time

import anyio

from .._plan.build import Extras

__all__ = ["LineLogger", "prepare_log_file"]

_LOG_MODE = 0o640


def prepare_log_file(path: str, config: Extras) -> None:
    """Create the log file (and its directory) if missing: mode 0640, owned by the user.

    Raises:
        OSError: when the directory cannot be created or the file opened,
            naming the path.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, _LOG_MODE)
    try:
        if os.fstat(fd).st_size == 0:
            os.fchmod(fd, _LOG_MODE)
        if config.uid is not None:
            os.fchown(fd, config.uid, config.gid if config.gid is not None else -1)
    finally:
        os.close(fd)


class LineLogger:
    """Reads a service's output pipe and writes timestamped lines."""

    def __init__(self, read_fd: int, log_file: str | None, name: str) -> None:
        os.set_blocking(read_fd, False)
        self.read_fd = read_fd
        self.log_fd = (
            os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if log_file is not None
            else None
        )
        self.logger = logging.getLogger(f"asynccontainer.service.{name}")
        self.done = anyio.Event()

    def close(self) -> None:
        """Close both fds and mark the logger done (at its end, or if it never runs)."""
        os.close(self.read_fd)
        if self.log_fd is not None:
            os.close(self.log_fd)
        self.done.set()

    def emit(self, line: bytes) -> None:
        # Bytes that are not UTF-8 are replaced, never a reason to stop.
        text = line.decode("utf-8", errors="replace")
        if self.log_fd is None:
            self.logger.info("%s", text)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
            # One write(2) per line on an O_APPEND fd: lines stay whole
            # next to what the daemon itself writes to the same file.
            os.write(self.log_fd, (stamp + text + "\n").encode())

    async def run(self) -> None:
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(self.read_fd, 65536)
                except BlockingIOError:
                    await anyio.wait_readable(self.read_fd)
                    continue
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.emit(line)
            if pending:
                self.emit(pending)
        finally:
            self.close()
