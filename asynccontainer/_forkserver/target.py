"""What every process the fork server starts does at its end: report, then exec or call.

Shared by the container child and the excursion child. Everything here ends
in exec or `os._exit`: nothing of the server's state may run again.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import traceback
from typing import NoReturn

from .._wire import ExceptionInfo, Execing, Ready, SetupFailed, send_frame

__all__ = [
    "EXIT_EXEC_FAILED",
    "EXIT_PARENT_DIED",
    "EXIT_SETUP_FAILED",
    "install_stdio",
    "report",
    "run_callable",
    "run_target",
    "unpickle",
]

# Guix's exit codes for a child that never got to run its target.
EXIT_PARENT_DIED = 2
EXIT_SETUP_FAILED = 3
# What a shell reports for a command it could not execute.
EXIT_EXEC_FAILED = 127


def run_target(
    handshake: socket.socket,
    command: tuple[str, ...] | None,
    target: object,
    env: dict[str, str],
    send_root: bool = False,
) -> NoReturn:
    """Exec the command or run the callable, reporting on the handshake first."""
    root = [os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)] if send_root else []
    if command is not None:
        report(handshake, Execing(), root)
        try:
            # The handshake socket is close-on-exec: its end-of-file tells
            # the caller that this exec succeeded.
            os.execvpe(command[0], list(command), env)
        except OSError as exc:
            # As subprocess reports it: the program as it was given, not the
            # last PATH entry execvpe happened to try.
            error = OSError(exc.errno, exc.strerror, command[0])
            report(handshake, SetupFailed(ExceptionInfo.capture(error)))
            os._exit(EXIT_EXEC_FAILED)
    os.environ.clear()
    os.environ.update(env)
    report(handshake, Ready(), root)
    handshake.close()
    for fd in root:
        os.close(fd)
    run_callable(target)


def report(handshake: socket.socket, message: object, fds: list[int] | None = None) -> None:
    try:
        send_frame(handshake, message, fds or ())
    except OSError:
        # The caller is gone; whatever happens next, nobody is listening.
        pass


def unpickle(pickled: bytes | None, sys_path: tuple[str, ...]) -> object:
    # Unpickle while the host's files are in reach: the callable may refer
    # to modules (a test file, the caller's package) by name.
    if pickled is None:
        return None
    if sys_path:
        sys.path[:] = sys_path
    return pickle.loads(pickled)


def install_stdio(stdio: list[int]) -> None:
    for number, fd in enumerate(stdio):
        os.dup2(fd, number)
    for fd in stdio:
        if fd > 2:
            os.close(fd)


def run_callable(target: object) -> NoReturn:
    """Run the callable as Guix's call-with-clean-exit: 0 if it returns, 1 if it raises."""
    status = 0
    try:
        assert callable(target)
        target()
    except SystemExit as exc:
        # As the interpreter itself would treat it at exit.
        if exc.code is None:
            status = 0
        elif isinstance(exc.code, int):
            status = exc.code & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)
