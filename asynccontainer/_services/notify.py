"""The sd_notify protocol's receiving end: a datagram socket per service, in the caller.

sd_notify(3): the service sends datagrams of newline-separated KEY=VALUE
lines to the socket named by $NOTIFY_SOCKET. The caller binds it in a
directory of its own (mode 0700) and maps the socket alone into the
service's container, at the same path.

Everything received is the service's word, and the service may be hostile:
a datagram is read whole into a bounded buffer (a longer one is dropped),
never as code; file descriptors sent along (SCM_RIGHTS) are closed at once;
and a datagram counts only if the kernel's credentials (SO_PASSCRED, so the
sender cannot forge them: unix(7)) name a process the caller's predicate
accepts as one of the service's.
"""

from __future__ import annotations

import array
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable

import anyio
import anyio.lowlevel

__all__ = ["MAX_DATAGRAM", "NotifySocket", "parse_message"]

MAX_DATAGRAM = 4096
"""The largest datagram taken; systemd's own limit for a notify message is larger,
but every field the protocol defines fits in a fraction of it."""

# struct ucred: pid, uid, gid (unix(7)).
_UCRED = struct.Struct("iII")
# Room for the credentials and a few descriptors, which are then closed.
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(16 * 4)


def parse_message(data: bytes) -> dict[str, str]:
    """Return the KEY=VALUE fields of a notify datagram; lines without "=" are skipped.

    Bytes that are not UTF-8 are replaced: a value is shown, never run.
    """
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", errors="replace").split("\n"):
        key, equals, value = line.partition("=")
        if equals and key:
            fields[key] = value
    return fields


def _base() -> str:
    """Return $TMPDIR (tempfile's choice), or /tmp if a socket path there would be too long.

    sun_path holds 108 bytes with its NUL (unix(7)).
    """
    base = tempfile.gettempdir()
    longest = os.path.join(base, "ac-notify-" + "x" * 8, "notify")
    return base if len(os.fsencode(longest)) < 108 else "/tmp"


class NotifySocket:
    """A bound datagram socket (SO_PASSCRED) in a private directory, removed by `close`.

    Raises:
        OSError: the directory or the socket could not be made.
    """

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="ac-notify-", dir=_base())
        self.path = os.path.join(self.directory, "notify")
        try:
            self.socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                self.socket.bind(self.path)
                # Sending needs write permission on the socket (unix(7)), for
                # a service of any uid; the directory keeps everyone else out.
                os.chmod(self.path, 0o666)
            except BaseException:
                self.socket.close()
                raise
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def close(self) -> None:
        """Close the socket and remove its directory."""
        self.socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _receive(self) -> tuple[bytes, int] | None:
        """Return a datagram and its sender's PID, or None to drop it; BlockingIOError: none."""
        data, ancillary, flags, _ = self.socket.recvmsg(MAX_DATAGRAM + 1, _ANCILLARY)
        pid = None
        for level, kind, payload in ancillary:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
            elif kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                pid = _UCRED.unpack_from(payload)[0]
        if pid is None or len(data) > MAX_DATAGRAM or flags & socket.MSG_TRUNC:
            return None
        return data, pid

    async def messages(self, accept: Callable[[int], bool]) -> AsyncIterator[dict[str, str]]:
        """Yield the fields of each datagram whose sender `accept(pid)` takes; forever.

        A checkpoint follows every datagram, so a flood of them cannot keep
        the event loop from other tasks. Cancellation: it stops between
        datagrams; nothing is lost but what was not read yet.
        """
        while True:
            try:
                received = self._receive()
            except BlockingIOError:
                await anyio.wait_readable(self.socket)
                continue
            if received is not None and accept(received[1]):
                yield parse_message(received[0])
            await anyio.lowlevel.checkpoint()
