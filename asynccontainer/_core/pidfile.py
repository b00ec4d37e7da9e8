"""read_pid_file: wait for a daemon's PID file, on the host or inside a container.

Shepherd polls a PID file once a second. Here the file's directory is
watched with inotify (one instance per event loop, `_core.inotify`), so a
write is seen within milliseconds; a bounded, growing poll interval is the
safety net (and the only means while the directory does not exist yet, or
when no inotify instance can be had).

Inside a container, the path is resolved from the container's root
(/proc/PID/root, with openat2's RESOLVE_IN_ROOT so that ".." and absolute
symlinks stay inside it), which needs no process to be forked. The PID read
there belongs to the container's pid namespace; it is translated to the
host PID through the NSpid lines of /proc/*/status.
"""

from __future__ import annotations

import errno
import math
import os
import select
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from .. import _kernel
from .._errors import PidFileTimeoutError
from .inotify import Watch

if TYPE_CHECKING:
    from .container import Container

__all__ = ["PidTranslator", "read_pid_file", "wait_for_pid_file"]

# The poll interval starts small and doubles up to this. With inotify
# working it is only a safety net (a network file system without events,
# say); without the directory it is how its creation is noticed.
_POLL_FIRST = 0.001
_POLL_LAST = 0.05


class _NotYet(Exception):
    """The file does not hold a usable PID yet; the message says why."""


# How often an open inside a container's root is tried again after EAGAIN.
_EAGAIN_RETRIES = 64


class _Opener:
    """Opens paths on the host, or inside a container's root."""

    def __init__(self, root_fd: int | None) -> None:
        self.root_fd = root_fd

    def __call__(self, path: str, flags: int) -> int:
        if self.root_fd is None:
            return os.open(path, flags | os.O_CLOEXEC)
        for _ in range(_EAGAIN_RETRIES):
            try:
                return _kernel.openat2(
                    self.root_fd,
                    path,
                    flags,
                    _kernel.RESOLVE_IN_ROOT | _kernel.RESOLVE_NO_MAGICLINKS,
                )
            except BlockingIOError:
                # openat2(2): with RESOLVE_IN_ROOT, a ".." on the way (a
                # relative link such as /var/run -> ../run) fails EAGAIN
                # when a rename or a mount anywhere raced it; "the caller
                # may choose to retry". Many containers starting at once do.
                continue
        return _kernel.openat2(
            self.root_fd, path, flags, _kernel.RESOLVE_IN_ROOT | _kernel.RESOLVE_NO_MAGICLINKS
        )

    def open_regular(self, path: str) -> int:
        """Open `path` for reading if it is a regular file (not through a final link).

        The file is first opened O_PATH, which never blocks and opens no
        device: a PID file that is a FIFO (or a link to a terminal) would
        otherwise hang open(2), and the whole event loop with it. Only a
        regular file is then opened for reading, through its fd.

        Raises:
            _NotYet: when it is not a regular file.
            OSError: as openat2(2) or open(2) fail.
        """
        fd = self(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _NotYet("it is not a regular file")
            return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        finally:
            os.close(fd)


def _no_writer(fd: int) -> bool:
    """Return True if no process has the file open for writing.

    A read lease is refused with EAGAIN while the file is open for writing
    (fcntl(2), "Leases"); it also needs the caller to own the file (or
    CAP_LEASE) and a file system that supports leases. When it cannot be
    asked, the answer is False and the inotify close event decides.
    """
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def _parse(content: bytes, complete: bool) -> int:
    """Return the PID the content names, or raise _NotYet (or ValueError for garbage)."""
    text = content.decode("ascii", errors="replace")
    stripped = text.strip()
    if not stripped:
        raise _NotYet("it is empty")
    if not stripped.isdigit():
        if text.endswith("\n"):
            # A finished line that is not a number will not become one.
            raise ValueError(f"it holds {stripped[:40]!r}, which is not a PID")
        raise _NotYet(f"it holds {stripped[:40]!r}, not a PID (yet)")
    # A number without its newline may be half-written ("12" of "1234\n")
    # unless the writer has closed the file since.
    if not (text.endswith("\n") or complete):
        raise _NotYet(f"it holds {stripped!r} without a final newline, still open for writing")
    pid = int(stripped)
    if pid <= 0:
        raise ValueError(f"it holds {pid}, which is not a PID")
    return pid


def _status_fields(pid: int | str) -> tuple[str, list[int]]:
    """Return (state, NSpid) of a process, or raise OSError if it is gone."""
    state = ""
    nspid: list[int] = []
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("State:"):
                state = line.split()[1]
            elif line.startswith("NSpid:"):
                nspid = [int(field) for field in line.split()[1:]]
                break
    return state, nspid


def _alive(pid: int) -> bool:
    try:
        state, _ = _status_fields(pid)
    except OSError:
        return False
    return state not in ("Z", "X")


class PidTranslator:
    """Translates PIDs of a container's pid namespace to the host's.

    What it needs of the container (the depth of its pid namespace, and
    the namespace's identity) is read once, when it is made, so that it
    keeps working after the container's first process exits.
    """

    def __init__(self, container_pid: int | None) -> None:
        self.level = 0
        self.namespace: tuple[int, int] | None = None
        if container_pid is None:
            return
        try:
            _, nspid = _status_fields(container_pid)
            ns = os.stat(f"/proc/{container_pid}/ns/pid")
        except FileNotFoundError:
            raise ProcessLookupError(
                3, f"no process with PID {container_pid} (it may have exited)"
            ) from None
        self.level = len(nspid) - 1
        self.namespace = (ns.st_dev, ns.st_ino)

    def __call__(self, pid_in_container: int) -> int:
        """Return the host PID of a live process; raise _NotYet if there is none."""
        if self.level == 0:
            # The container shares the caller's pid namespace.
            if _alive(pid_in_container):
                return pid_in_container
            raise _NotYet(f"it names PID {pid_in_container}, which is not alive")
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                state, nspid = _status_fields(name)
                if len(nspid) != self.level + 1 or nspid[self.level] != pid_in_container:
                    continue
                theirs = os.stat(f"/proc/{name}/ns/pid")
            except OSError:
                continue  # it exited meanwhile
            if (theirs.st_dev, theirs.st_ino) == self.namespace:
                if state in ("Z", "X"):
                    break
                return int(name)
        raise _NotYet(f"it names PID {pid_in_container} of the container, which is not alive")


def _read(opener: _Opener, file: str, watch: Watch) -> tuple[bytes, bool]:
    """Return the PID file's first bytes, and whether its writer is done with it.

    Raises:
        _NotYet: it does not exist, cannot be opened (a link in the way),
            or is not a regular file.
    """
    try:
        fd = opener.open_regular(file)
    except FileNotFoundError:
        raise _NotYet("it does not exist") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
            raise
        raise _NotYet(f"it cannot be opened ({exc.strerror})") from None
    try:
        content = os.read(fd, 4096)
        return content, watch.closed_after_write or _no_writer(fd)
    finally:
        os.close(fd)


def _still_running(pidfd: int) -> bool:
    """Return whether the process of a pidfd runs: a pidfd turns readable at its exit."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


async def read_pid_file(
    path: str | os.PathLike[str],
    *,
    timeout: float = 5.0,
    container: Container | int | None = None,
) -> int:
    """Wait until `path` names a live process and return its (host) PID.

    An empty or half-written file (digits without their final newline,
    while the writer still has it open) is read again, not an error. A
    change of the file is noticed within milliseconds (inotify on its
    directory). A PID that names no live process is not accepted either:
    the file may be stale.

    Args:
        path: the PID file. With `container`, an absolute path inside it.
        timeout: seconds to wait, more than zero.
        container: a `Container` or the host PID of any process: `path` is
            looked up in its mount namespace (from its root), and the PID
            found, which is in its pid namespace, is translated to the host.

    Returns:
        The host PID.

    Raises:
        PidFileTimeoutError: (a TimeoutError) after `timeout` seconds,
            naming the path and what it held last.
        ValueError: a finished line that is not a PID; a bad `timeout`; a
            relative path with `container`.
        ProcessLookupError: the container has exited.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {timeout!r}")
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be more than zero seconds, not {timeout!r}")
    file = os.fspath(path)
    if not isinstance(file, str):
        raise TypeError(f"path must be a str path, not {path!r}")

    if container is None:
        return await wait_for_pid_file(
            os.path.abspath(file), timeout=timeout, root_fd=None, translate=PidTranslator(None)
        )
    from .container import Container

    if isinstance(container, bool) or not isinstance(container, Container | int):
        raise TypeError(f"container must be a Container or a PID, not {container!r}")
    if not file.startswith("/"):
        raise ValueError(f"the PID file {file!r} must be an absolute path in the container")
    if isinstance(container, Container) and container.returncode is not None:
        raise ProcessLookupError(3, f"{container!r} has exited")
    container_pid = container.pid if isinstance(container, Container) else container
    # A pidfd of our own: it says when the container exits, and that the
    # /proc entries opened below were its own, not a recycled PID's.
    try:
        pidfd = _kernel.pidfd_open(container_pid)
    except ProcessLookupError:
        raise ProcessLookupError(
            3, f"no process with PID {container_pid} (it may have exited)"
        ) from None
    try:
        translate = PidTranslator(container_pid)
        root_fd = _open_root(container_pid)
        if not _still_running(pidfd):
            os.close(root_fd)
            raise ProcessLookupError(3, f"{container!r} has exited")
        return await wait_for_pid_file(
            file,
            timeout=timeout,
            root_fd=root_fd,
            translate=translate,
            where=f" in {container!r}",
            alive=lambda: _still_running(pidfd),
        )
    finally:
        os.close(pidfd)


def _open_root(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(3, f"no process with PID {pid} (it may have exited)") from None


async def wait_for_pid_file(
    file: str,
    *,
    timeout: float,
    root_fd: int | None,
    translate: PidTranslator,
    where: str = "",
    alive: Callable[[], bool] | None = None,
) -> int:
    """Wait for `file` (opened from `root_fd`, which this closes) to name a live process.

    The engine of read_pid_file, also used by services, which keep their
    container's root open themselves. `alive` says whether the container
    still runs: once it does not, waiting longer is useless.

    Raises:
        PidFileTimeoutError, ValueError: as read_pid_file.
        ProcessLookupError: `alive` said the container has exited.
    """
    opener = _Opener(root_fd)
    directory, name = os.path.split(file)
    try:
        watch = Watch(opener, directory or "/", name)
    except BaseException:
        if root_fd is not None:
            os.close(root_fd)
        raise
    deadline = anyio.current_time() + timeout
    interval = _POLL_FIRST
    try:
        while True:
            watching = watch.ensure()
            try:
                return translate(_parse(*_read(opener, file, watch)))
            except _NotYet as not_yet:
                why = str(not_yet)
            except ValueError as exc:
                raise ValueError(f"the PID file {file}{where} is not valid: {exc}") from None
            if alive is not None and not alive():
                raise ProcessLookupError(
                    3, f"the container{where} exited before its PID file {file} named a process"
                )
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise PidFileTimeoutError(
                    f"the PID file {file}{where} named no live process within {timeout} s: {why}",
                    file,
                    timeout,
                )
            if watching:
                # Events wake us at once; the cap only guards against a file
                # system that sends none.
                await watch.wait(min(remaining, _POLL_LAST * 4))
            else:
                await anyio.sleep(min(remaining, interval))
                interval = min(interval * 2, _POLL_LAST)
    finally:
        watch.close()
        if root_fd is not None:
            os.close(root_fd)
