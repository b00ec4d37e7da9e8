"""What the container and the excursion processes share: reports, unpickling, calling.

Everything that ends a process here ends in `os._exit`: nothing of the
server's state may run again.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import traceback
from typing import NoReturn

from .._wire import send_frame

__all__ = [
    "EXIT_EXEC_FAILED",
    "EXIT_PARENT_DIED",
    "EXIT_SETUP_FAILED",
    "report",
    "run_callable",
    "unpickle",
]

# Guix's exit codes for a child that never got to run its target.
EXIT_PARENT_DIED = 2
EXIT_SETUP_FAILED = 3
# What a shell reports for a command it could not execute.
EXIT_EXEC_FAILED = 127


def report(handshake: socket.socket, message: object, fds: list[int] | None = None) -> None:
    """Send a message to the caller; nothing if it is gone."""
    try:
        send_frame(handshake, message, fds or ())
    except OSError:
        # The caller is gone; whatever happens next, nobody is listening.
        pass


def unpickle(pickled: bytes | None, sys_path: tuple[str, ...]) -> object:
    """Unpickle a callable of the caller's, with its sys.path (None stays None)."""
    # Unpickle while the host's files are in reach: the callable may refer
    # to modules (a test file, the caller's package) by name.
    if pickled is None:
        return None
    if sys_path:
        sys.path[:] = sys_path
    return pickle.loads(pickled)


def run_callable(target: object) -> NoReturn:
    """Run the callable as Guix's call-with-clean-exit: 0 if it returns, 1 if it raises.

    Every path ends in os._exit, whatever raises on the way: the callable,
    its SystemExit's code, or stderr itself (a full device, a closed pipe);
    nothing may unwind into the fork server's frames.
    """
    status = 1
    try:
        try:
            assert callable(target)
            target()
            status = 0
        except SystemExit as exc:
            status = _exit_status(exc)
        except BaseException:
            traceback.print_exc()
    except BaseException:
        pass  # the report itself failed; the status stands
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(status)


def _exit_status(exc: SystemExit) -> int:
    """Return the status the interpreter itself would exit with for `exc`."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1
