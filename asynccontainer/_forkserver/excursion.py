"""Guix's container-excursion, in the excursion process the fork server cloned.

The process joins the target's namespaces with one setns(pidfd, flags),
chdirs to "/", and forks once more so the pid namespace applies (setns(2): a
new pid namespace only takes effect for children). The target runs in that
second child, whose status or value comes back to the caller.
"""

from __future__ import annotations

import importlib.abc
import os
import signal
import socket
import sys
from typing import NoReturn

import cloudpickle

from .. import _kernel
from .._plan.steps import ExcursionPlan
from .._wire import ExceptionInfo, Execing, Raised, Ready, Returned, SetupFailed
from .target import (
    EXIT_EXEC_FAILED,
    EXIT_PARENT_DIED,
    EXIT_SETUP_FAILED,
    report,
    run_callable,
    unpickle,
)

__all__ = ["join_namespaces", "refuse_new_imports", "run_excursion"]


# Guix's order: user first, so that its capabilities allow joining the
# others; mnt last, since /proc of the target is out of reach after it. A
# single setns(pidfd, flags) joins them all at once (Linux 5.8), and the
# kernel applies them in a safe order; the list only decides what differs.
_JOIN_ORDER = (
    ("user", _kernel.CLONE_NEWUSER),
    ("cgroup", _kernel.CLONE_NEWCGROUP),
    ("ipc", _kernel.CLONE_NEWIPC),
    ("uts", _kernel.CLONE_NEWUTS),
    ("net", _kernel.CLONE_NEWNET),
    ("pid", _kernel.CLONE_NEWPID),
    ("mnt", _kernel.CLONE_NEWNS),
)


def _pidfd_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                if pid > 0:
                    return pid
    raise ProcessLookupError(3, "the process to enter has exited")


def join_namespaces(pidfd: int) -> int:
    """Join every namespace of the pidfd's process that this process does not share.

    Joining a namespace one is already in fails (EINVAL for one's own user
    namespace), and a process entering itself must not call setns at all,
    so namespaces are compared first. Returns the CLONE_NEW* flags joined.

    Raises:
        ProcessLookupError: when the process has exited.
        PermissionError: when this process may not enter it.
    """
    pid = _pidfd_pid(pidfd)
    flags = 0
    for name, flag in _JOIN_ORDER:
        mine = os.stat(f"/proc/self/ns/{name}")
        theirs = os.stat(f"/proc/{pid}/ns/{name}")
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            flags |= flag
    if flags:
        _kernel.setns(pidfd, flags)
    return flags


def _install_stdio(stdio: list[int]) -> None:
    for number, fd in enumerate(stdio):
        os.dup2(fd, number)
    for fd in stdio:
        if fd > 2:
            os.close(fd)


def _run_target(
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


def run_excursion(handshake: socket.socket, config: ExcursionPlan, fds: list[int]) -> NoReturn:
    """Guix's container-excursion: join the target's namespaces, fork, run there."""
    try:
        # In the target's user namespace its processes hold CAP_SYS_PTRACE:
        # a dumpable excursion could be attached to and made to send the
        # caller a forged pickle. A process that is not dumpable may only be
        # traced with the capability in the namespace its memory belongs to,
        # the host's (ptrace(2), "Ptrace access mode checking"). Its child
        # inherits this; exec of a command resets it, after which the
        # handshake is closed.
        _kernel.prctl(_kernel.PR_SET_DUMPABLE, 0)
        if len(fds) != 4:
            raise ValueError(f"an excursion needs 4 fds, got {len(fds)}")
        target = unpickle(config.pickled_callable, config.sys_path)
        # Once inside, the file system is the container's: a module imported
        # there (an encoding looked up lazily, say) would be the container's
        # code, run in this process, which then answers the caller.
        refuse_new_imports()
        _install_stdio(fds[:3])
        join_namespaces(fds[3])
        os.close(fds[3])
        os.chdir("/")
        # A new pid namespace only applies to children (setns(2)): the
        # target runs in a child, which this process waits for.
        child = os.fork()
    except BaseException as exc:
        report(handshake, SetupFailed(ExceptionInfo.capture(exc)))
        os._exit(EXIT_SETUP_FAILED)
    if child == 0:
        try:
            _kernel.prctl(_kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        except BaseException:
            os._exit(EXIT_PARENT_DIED)
        env = dict(config.env)
        if config.want_value:
            _return_value(handshake, target, env)
        _run_target(handshake, config.command, target, env)
    handshake.close()
    _, status = os.waitpid(child, 0)
    _exit_like(status)


def _return_value(handshake: socket.socket, target: object, env: dict[str, str]) -> NoReturn:
    """Run the callable and send back its value or its exception (container-excursion*).

    Every path ends in os._exit, whatever the callable, its value or its
    exception raise on the way (a __reduce__ or a __repr__ that raises,
    SystemExit): nothing may unwind into the fork server's frames.
    """
    try:
        os.environ.clear()
        os.environ.update(env)
        assert callable(target)
        value = target()
    except BaseException as exc:
        report(handshake, Raised(ExceptionInfo.capture(exc)))
        os._exit(1)
    try:
        message: object = Returned(cloudpickle.dumps(value))
    except BaseException as exc:
        error = TypeError(f"the value cannot be pickled to be sent back: {_describe(exc)}")
        message = Raised(ExceptionInfo.capture(error))
    try:
        report(handshake, message)
    finally:
        os._exit(0 if isinstance(message, Returned) else 1)


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__qualname__}: {exc}"
    except BaseException:
        return type(exc).__qualname__


class _RefuseImports(importlib.abc.MetaPathFinder):
    """A finder that refuses every import not done already."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        raise ImportError(
            f"{fullname} is not imported in an excursion once it is in the container's "
            "namespaces, whose files are the container's: import it at the top of the module "
            "that defines the callable, so that it is imported before",
            name=fullname,
        )


def refuse_new_imports() -> None:
    """Make every import of a module not imported yet fail, from now on, in this process."""
    sys.path[:] = []
    sys.path_hooks[:] = []
    sys.path_importer_cache.clear()
    sys.meta_path[:] = [_RefuseImports()]


def _exit_like(status: int) -> NoReturn:
    """Exit with the same wait status as the child that ended with `status`."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            # SIGKILL and SIGSTOP cannot be given a disposition (EINVAL),
            # and need none: they are never caught.
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        except BaseException:
            pass  # never unwind into the fork server's frames
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))
