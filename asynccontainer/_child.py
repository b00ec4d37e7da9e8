"""What the container process does between clone() and running its target.

This is Guix's run-container child branch. It runs in a copy of the fork
server (single-threaded, so the copy is sound), never returns, and always
ends in exec or `os._exit`: nothing of the server's state may run again here,
not even its finalizers.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from typing import NoReturn

from . import _kernel
from ._config import ContainerConfig
from ._mount import bring_loopback_up, lock_mounts, mount_file_systems
from ._protocol import (
    ContainerSetup,
    ExceptionInfo,
    Execing,
    FrameBuffer,
    Ready,
    SetupFailed,
    recv_frame,
    send_frame,
)

__all__ = ["container_main"]

# Guix's exit codes for a child that never got to run its target.
EXIT_PARENT_DIED = 2
EXIT_SETUP_FAILED = 3
# What a shell reports for a command it could not execute.
EXIT_EXEC_FAILED = 127

# Signals the server ignores or handles, restored to their defaults: an
# ignored disposition survives execve(2), and subprocess resets these too.
_RESET_SIGNALS = (
    signal.SIGCHLD,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGTERM,
)


def _close_fds_except(keep: set[int]) -> None:
    """Close every fd above 2 but those in `keep` (the server's sockets above all)."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)


def _reset_process_state() -> None:
    signal.set_wakeup_fd(-1)
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def container_main(handshake_fd: int, go_fd: int) -> NoReturn:
    """Run the container's side of the handshake, set it up, run its target.

    Never returns: the process execs the command, or exits with the
    callable's status (0, or 1 after printing its traceback), or with
    EXIT_PARENT_DIED, EXIT_SETUP_FAILED or EXIT_EXEC_FAILED.
    """
    try:
        _reset_process_state()
        # Die with the server; and since PR_SET_PDEATHSIG is not inherited
        # across fork, a container with a pid namespace takes its whole
        # namespace down with it (its PID 1 dying kills the rest).
        _kernel.prctl(_kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        _close_fds_except({handshake_fd, go_fd})
        # Wait until the server has written the id maps (Guix's "ready").
        # End-of-file means the server died or gave up on us.
        if os.read(go_fd, 1) != b"g":
            os._exit(EXIT_PARENT_DIED)
        os.close(go_fd)
    except BaseException:
        os._exit(EXIT_PARENT_DIED)

    handshake = socket.socket(fileno=handshake_fd)
    try:
        message, stdio = recv_frame(handshake, FrameBuffer())
    except BaseException:
        os._exit(EXIT_PARENT_DIED)
    if not isinstance(message, ContainerSetup) or not isinstance(message.config, ContainerConfig):
        os._exit(EXIT_PARENT_DIED)
    config = message.config

    try:
        target = _set_up(config, stdio)
    except BaseException as exc:
        _report(handshake, SetupFailed(ExceptionInfo.capture(exc)))
        os._exit(EXIT_SETUP_FAILED)

    env = dict(config.env)
    if config.command is not None:
        _report(handshake, Execing())
        try:
            # The handshake socket is close-on-exec: its end-of-file tells
            # the caller that this exec succeeded.
            os.execvpe(config.command[0], list(config.command), env)
        except OSError as exc:
            # As subprocess reports it: the program as it was given, not the
            # last PATH entry execvpe happened to try.
            error = OSError(exc.errno, exc.strerror, config.command[0])
            _report(handshake, SetupFailed(ExceptionInfo.capture(error)))
            os._exit(EXIT_EXEC_FAILED)

    os.environ.clear()
    os.environ.update(env)
    _report(handshake, Ready())
    handshake.close()
    _run_callable(target)


def _report(handshake: socket.socket, message: object) -> None:
    try:
        send_frame(handshake, message)
    except OSError:
        # The caller is gone; whatever happens next, nobody is listening.
        pass


def _set_up(config: ContainerConfig, stdio: list[int]) -> object:
    """Do every set-up step of the container; return the unpickled callable (or None)."""
    import pickle

    # Unpickle while the host's files are in reach: the callable may refer
    # to modules (a test file, the caller's package) by name.
    if config.sys_path:
        sys.path[:] = config.sys_path
    target = pickle.loads(config.pickled_callable) if config.pickled_callable else None
    populate = pickle.loads(config.pickled_populate) if config.pickled_populate else None

    for number, fd in enumerate(stdio):
        os.dup2(fd, number)
    for fd in stdio:
        if fd > 2:
            os.close(fd)

    if config.hostname is not None:
        _kernel.sethostname(config.hostname)
    proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if "mnt" in config.namespaces:
            mount_file_systems(
                root=config.root,
                mounts=config.mounts,
                namespaces=config.namespaces,
                writable_root=config.writable_root,
                populate=populate,
                write_hosts="net" in config.namespaces and config.loopback_network,
            )
        if "net" in config.namespaces and config.loopback_network:
            bring_loopback_up()
        if config.lock_mounts and {"mnt", "user"} <= config.namespaces:
            lock_mounts(proc_fd)
    finally:
        os.close(proc_fd)
    os.chdir(config.cwd)
    return target


def _run_callable(target: object) -> NoReturn:
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
