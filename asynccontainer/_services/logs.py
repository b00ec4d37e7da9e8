"""A service's log: its file opened safely on the host, and the lines of its output pipe.

The service's stdout and stderr are one pipe; `LineLogger` reads it in the
caller and writes each line, timestamped, to the log file (or to the
`logging` module).

The log file is opened by the caller, as root for a root caller, in a
directory the service's user may be able to write. Nothing there is
trusted: a link is not followed (a link to a file of root's would give it
away), a file that exists is used as it is (never chmodded or chowned: it
may be /dev/null, or another of root's), and only a file this call
creates is given to the service's user.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import time

import anyio
import anyio.lowlevel

__all__ = ["MAX_LINE", "LineLogger", "Rotation", "open_log_file"]

_LOG_MODE = 0o640
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC

MAX_LINE = 64 * 1024
"""The longest line written whole; a longer one is split (no byte is lost)."""

_CHUNK = 65536


def _refuse(path: str, what: str) -> OSError:
    return OSError(
        errno.EINVAL,
        f"the log file is {what}; give the path of a regular file (or of a character "
        "device such as /dev/null)",
        path,
    )


def open_log_file(path: str, uid: int | None, gid: int | None) -> int:
    """Return an fd (append, close-on-exec) of the log file, created if missing.

    A file this call creates is made with O_EXCL, mode 0640, and only then
    given to `uid` and `gid`; an existing regular file or character device
    is opened as it is.

    Raises:
        OSError: ELOOP for a symbolic link, EINVAL for what is not a regular
            file or a character device (a FIFO, a directory ...), or as
            open(2) fails, naming the path.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return _open_log(path, uid, gid)


def _open_log(path: str, uid: int | None, gid: int | None, dir_fd: int | None = None) -> int:
    """Open_log_file's work, `path` relative to `dir_fd` if given."""
    try:
        fd = os.open(path, _APPEND | os.O_CREAT | os.O_EXCL, _LOG_MODE, dir_fd=dir_fd)
    except FileExistsError:
        return _open_existing(path, dir_fd)
    try:
        os.fchmod(fd, _LOG_MODE)  # the umask may have taken bits of it
        if uid is not None:
            os.fchown(fd, uid, -1 if gid is None else gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_existing(path: str, dir_fd: int | None = None) -> int:
    try:
        # O_NONBLOCK: opening a FIFO for writing would wait for a reader.
        fd = os.open(path, _APPEND | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(
                errno.ELOOP, "the log file is a symbolic link, which is not followed", path
            ) from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):
            raise _refuse(path, "a directory" if exc.errno == errno.EISDIR else "a FIFO") from None
        raise
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
        os.close(fd)
        raise _refuse(path, "neither a regular file nor a character device")
    os.set_blocking(fd, True)
    return fd


class Rotation:
    """Rotates a log file by size, as Shepherd 1.0's log rotation: FILE to FILE.1 and so on.

    The directory is opened once, and every rename and the new file are
    relative to it: the service's user may write that directory, and
    rename(2) moves a link it planted there as a link, never what it
    points to. The new file is made as `open_log_file` makes one. A
    rotation that fails (a directory planted where FILE.2 goes, a link
    where FILE goes) keeps the current file and is reported through
    `logging` once.
    """

    def __init__(self, path: str, max_bytes: int, keep: int, uid: int | None, gid: int | None):
        self.name = os.path.basename(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.owner = (uid, gid)
        self.directory = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.size = 0
        self.failed = False

    def start(self, fd: int) -> bool:
        """Take the size of the file open at `fd`; return False if it is not a regular file."""
        info = os.fstat(fd)
        self.size = info.st_size
        return stat.S_ISREG(info.st_mode)

    def rotate(self, fd: int, logger: logging.Logger) -> int:
        """Rename FILE.(k) to FILE.(k+1), FILE to FILE.1; return the fd of a new FILE.

        On failure, return `fd` (the current file goes on growing).
        """
        d = self.directory
        try:
            for k in range(self.keep - 1, 0, -1):
                try:
                    os.rename(
                        f"{self.name}.{k}", f"{self.name}.{k + 1}", src_dir_fd=d, dst_dir_fd=d
                    )
                except FileNotFoundError:
                    pass
            os.rename(self.name, f"{self.name}.1", src_dir_fd=d, dst_dir_fd=d)
            new = _open_log(self.name, *self.owner, dir_fd=d)
        except OSError as exc:
            if not self.failed:
                self.failed = True
                logger.error("cannot rotate the log file %s (%s); it keeps growing", self.name, exc)
            return fd
        os.close(fd)
        self.size = 0
        return new

    def close(self) -> None:
        """Close the directory's fd."""
        os.close(self.directory)


class LineLogger:
    """Reads a service's output pipe and writes timestamped lines.

    It yields to the event loop after every chunk (a service writing as
    fast as it can must not starve the loop), finds line ends only in new
    data, and splits a line longer than MAX_LINE. A log file that fails
    (ENOSPC, EIO) stops nothing: the lines are counted as dropped and the
    failure reported through `logging`, once per kind of error.
    """

    def __init__(
        self,
        read_fd: int,
        log_fd: int | None,
        name: str,
        recent: collections.deque[str] | None = None,
        rotation: Rotation | None = None,
    ) -> None:
        os.set_blocking(read_fd, False)
        # Only a regular file grows: /dev/null and the like are never rotated.
        self.rotation = rotation
        if rotation is not None and (log_fd is None or not rotation.start(log_fd)):
            rotation.close()
            self.rotation = None
        # The service's last lines, kept whatever the log file does.
        self.recent: collections.deque[str] = (
            collections.deque(maxlen=100) if recent is None else recent
        )
        self.read_fd = read_fd
        self.log_fd = log_fd
        self.logger = logging.getLogger(f"asynccontainer.service.{name}")
        self.done = anyio.Event()
        self.dropped = 0
        """How many lines could not be written to the log file."""
        self._reported: set[int] = set()

    def close(self) -> None:
        """Close both fds and mark the logger done (at its end, or if it never runs)."""
        os.close(self.read_fd)
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None
        if self.rotation is not None:
            self.rotation.close()
            self.rotation = None
        self.done.set()

    def emit(self, line: bytes) -> None:
        """Write one line: to the log file with its time stamp, or to the logger."""
        # Bytes that are not UTF-8 are replaced, never a reason to stop.
        text = line.decode("utf-8", errors="replace").removesuffix("\r")  # a CRLF line's
        self.recent.append(text)
        if self.log_fd is None:
            self.logger.info("%s", text)
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
        try:
            # One write(2) per line on an O_APPEND fd: lines stay whole
            # next to what the daemon itself writes to the same file.
            written = os.write(self.log_fd, (stamp + text + "\n").encode())
        except OSError as exc:
            self.dropped += 1
            if exc.errno not in self._reported:
                self._reported.add(exc.errno or 0)
                self.logger.error(
                    "cannot write to the log file (%s); its lines are dropped and counted",
                    exc.strerror,
                )
            return
        rotation = self.rotation
        if rotation is not None:
            # Between two lines: no line is split across files, none lost.
            rotation.size += written
            if rotation.size >= rotation.max_bytes:
                self.log_fd = rotation.rotate(self.log_fd, self.logger)

    async def run(self) -> None:
        """Relay lines until the pipe's end-of-file (every process of the service is gone)."""
        pending = bytearray()
        try:
            while True:
                try:
                    chunk = os.read(self.read_fd, _CHUNK)
                except BlockingIOError:
                    await anyio.wait_readable(self.read_fd)
                    continue
                if not chunk:
                    break
                self._take(pending, chunk)
                # A service that writes without pause would otherwise keep
                # this loop from ever giving the event loop a turn.
                await anyio.lowlevel.checkpoint()
            if pending:
                self.emit(bytes(pending))
        finally:
            self.close()

    def _take(self, pending: bytearray, chunk: bytes) -> None:
        """Add a chunk to the unfinished line; emit every line it completes, and long ones."""
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            pending += chunk[start:end]
            self._emit_long(pending)
            self.emit(bytes(pending))
            pending.clear()
            start = end + 1
        pending += chunk[start:]
        self._emit_long(pending)

    def _emit_long(self, pending: bytearray) -> None:
        """Emit MAX_LINE pieces of an unfinished line while it is longer than that."""
        while len(pending) > MAX_LINE:
            self.emit(bytes(pending[:MAX_LINE]))
            del pending[:MAX_LINE]
