"""One inotify instance per event loop, shared by every wait for a PID file.

An inotify instance is an fd, and the kernel allows 128 per user on the
whole machine by default (/proc/sys/fs/inotify/max_user_instances): one per
wait made 72 of 200 services with PID files fail to start. So each event
loop has a single instance, watches are counted per directory, and one
waiter at a time reads the events for all: it wakes every waiter after
each batch (each then looks at its own file again, which a spurious wake
costs a read of), and when it stops reading, whoever waits next takes its
place. When no instance can be had at all, `Watch.ensure` says so and the
caller polls.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

import anyio
import anyio.lowlevel

from .. import _kernel

__all__ = ["Watch"]

MASK = (
    _kernel.IN_CREATE
    | _kernel.IN_MODIFY
    | _kernel.IN_CLOSE_WRITE
    | _kernel.IN_MOVED_TO
    | _kernel.IN_DELETE
    | _kernel.IN_MOVED_FROM
    | _kernel.IN_DELETE_SELF
    | _kernel.IN_MOVE_SELF
    | _kernel.IN_ONLYDIR
)
_EVENT = struct.Struct("iIII")
_GONE = _kernel.IN_IGNORED | _kernel.IN_DELETE_SELF | _kernel.IN_MOVE_SELF


class _Instance:
    """An event loop's inotify instance: its watches, and what its events said."""

    def __init__(self, key: object) -> None:
        self.key = key
        self.fd = _kernel.inotify_init1()
        self.users = 0
        self.references: dict[int, int] = {}
        # (watch, file name) -> the writer closed the file after its last change.
        self.closed_after_write: dict[tuple[int, bytes], bool] = {}
        # Watches whose directory went away since they were made.
        self.gone: set[int] = set()
        self.reading = False
        self.changed = anyio.Event()

    def wake(self) -> None:
        """Wake every waiter (each looks at its file again)."""
        self.changed.set()
        self.changed = anyio.Event()

    def read_events(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & _kernel.IN_Q_OVERFLOW:
                self.closed_after_write.clear()
            if mask & _GONE:
                # The directory itself went away: watch again when it is back.
                self.gone.add(wd)
            if mask & (_kernel.IN_CLOSE_WRITE | _kernel.IN_MOVED_TO):
                self.closed_after_write[(wd, name)] = True
            elif mask & (_kernel.IN_MODIFY | _kernel.IN_CREATE):
                self.closed_after_write[(wd, name)] = False


_instances: dict[object, _Instance] = {}


def _instance() -> _Instance | None:
    """Return the current event loop's instance, made on first use; None if none can be."""
    key = anyio.lowlevel.current_token()
    found = _instances.get(key)
    if found is None:
        try:
            found = _instances[key] = _Instance(key)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            return None  # the caller polls instead
    found.users += 1
    return found


class Watch:
    """A watch on one file's directory, re-made when the directory is replaced."""

    def __init__(
        self, open_directory: Callable[[str, int], int], directory: str, name: str
    ) -> None:
        self._open_directory = open_directory
        self._directory = directory
        self._name = name.encode()
        self._instance = _instance()
        self._wd: int | None = None

    @property
    def closed_after_write(self) -> bool:
        """True once the writer closed the file after its last change (its content is whole)."""
        if self._instance is None or self._wd is None:
            return False
        return self._instance.closed_after_write.get((self._wd, self._name), False)

    def ensure(self) -> bool:
        """Watch the directory if it exists now; return whether it is watched."""
        instance = self._instance
        if instance is None:
            return False
        if self._wd is not None and self._wd not in instance.gone:
            return True
        self._release()
        try:
            dir_fd = self._open_directory(self._directory, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            # The magic link lets the watch follow a directory opened with
            # openat2 inside a container, which no host path names.
            wd = _kernel.inotify_add_watch(instance.fd, f"/proc/self/fd/{dir_fd}", MASK)
        except OSError:
            return False
        finally:
            os.close(dir_fd)
        instance.gone.discard(wd)
        instance.references[wd] = instance.references.get(wd, 0) + 1
        self._wd = wd
        return True

    async def wait(self, timeout: float) -> None:
        """Wait at most `timeout` seconds for an event of the loop's instance (or of another's)."""
        instance = self._instance
        if instance is None:
            await anyio.sleep(timeout)
            return
        with anyio.move_on_after(timeout):
            if instance.reading:
                await instance.changed.wait()
                return
            instance.reading = True
            try:
                await anyio.wait_readable(instance.fd)
                instance.read_events()
            finally:
                instance.reading = False
                # Someone else reads now, if anyone waits.
                instance.wake()

    def _release(self) -> None:
        instance = self._instance
        if instance is None or self._wd is None:
            return
        wd, self._wd = self._wd, None
        instance.references[wd] -= 1
        if instance.references[wd] == 0:
            del instance.references[wd]
            instance.closed_after_write = {
                key: value for key, value in instance.closed_after_write.items() if key[0] != wd
            }
            if wd not in instance.gone:
                try:
                    _kernel.inotify_rm_watch(instance.fd, wd)
                except OSError:
                    pass  # gone with its directory meanwhile
            instance.gone.discard(wd)

    def close(self) -> None:
        """Drop the watch; the loop's instance goes with its last user."""
        instance = self._instance
        if instance is None:
            return
        self._release()
        self._instance = None
        instance.users -= 1
        if instance.users == 0:
            del _instances[instance.key]
            os.close(instance.fd)
