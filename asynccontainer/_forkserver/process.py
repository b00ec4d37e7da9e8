"""The process steps: fds, host name, init, session, ids, capabilities, filters, exec or call.

Run in the container process, in the order the plan gives (see
`_plan.build` for why that order). Shepherd's exec-command steps (setsid,
setrlimit, setgroups, setgid, setuid, umask) are among them, as plain
steps a service's plan adds.
"""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import struct
import termios
from typing import NoReturn

from .. import _kernel
from .._kernel.seccomp import install_filter
from .._plan import steps
from .._wire import Execing, Ready
from .capabilities import keep_only, limit_bounding_set
from .init import run_init
from .state import State
from .target import report, run_callable, unpickle

__all__ = ["RUNNERS", "lift"]


def lift(fd: int, floor: int) -> int:
    """Move `fd` to the lowest free number from `floor` up (close-on-exec); return it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    os.close(fd)
    return moved


def unshare(state: State, step: steps.Unshare) -> None:
    """Enter new namespaces; see unshare(2) (a cgroup one is rooted where the process is)."""
    _kernel.unshare(step.flags)


def load_callable(state: State, step: steps.LoadCallable) -> None:
    """Unpickle a callable while the host's modules are still in reach."""
    state.objects[step.slot] = unpickle(step.pickled, step.sys_path)


def install_stdio(state: State, step: steps.InstallStdio) -> None:
    """Make the first three received fds the process's stdin, stdout and stderr."""
    stdio, state.received = state.received[:3], state.received[3:]
    for number, fd in enumerate(stdio):
        os.dup2(fd, number)  # inheritable, as the target must receive them
    for fd in stdio:
        os.close(fd)


def set_hostname(state: State, step: steps.SetHostname) -> None:
    """sethostname(2) in the container's uts namespace."""
    _kernel.sethostname(step.name)


# <linux/sockios.h>, <net/if.h>
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sh22x")


def bring_loopback_up(state: State, step: steps.BringLoopbackUp) -> None:
    """Set IFF_UP on `lo`: a new network namespace starts with it down (network_namespaces(7))."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ.pack(b"lo", 0)
        flags = _IFREQ.unpack(fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def chdir(state: State, step: steps.Chdir) -> None:
    """Change the working directory (a path of the container)."""
    os.chdir(step.target)


def install_passed_fds(state: State, step: steps.InstallPassedFds) -> None:
    """Put each received fd at its number (subprocess's pass_fds).

    The executor lifted every received fd above the largest number first,
    so that no dup2 here overwrites one not yet placed.
    """
    for fd, number in zip(state.received, step.numbers, strict=True):
        os.dup2(fd, number)  # inheritable, as the target must receive it
    for fd in state.received:
        os.close(fd)
    state.received = []


def start_init(state: State, step: steps.StartInit) -> None:
    """Fork: PID 1 stays as the init (never returns here), the child goes on."""
    if step.new_session:
        os.setsid()
    child = os.fork()
    if child != 0:
        state.handshake.close()
        run_init(child, step.status_fd, stay=not step.follow_child)
    if step.status_fd >= 0:
        os.close(step.status_fd)  # never the target's: only the init reports


def limit_bounding_set_step(state: State, step: steps.LimitBoundingSet) -> None:
    """Drop capabilities from the bounding set; keep the mask for KeepCapabilities."""
    state.kept = limit_bounding_set(step.keep, step.required, step.keep_across_setuid)


def start_session(state: State, step: steps.StartSession) -> None:
    """Become a session leader; take a terminal on stdin as the controlling terminal.

    In a session of its own the target cannot reach the caller's terminal
    (no TIOCSTI into it, no signals from its keyboard), and a terminal it
    is given (a pty) works fully: job control, Ctrl-C, window size.
    """
    os.setsid()
    if os.isatty(0):
        try:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        except PermissionError:
            # tty_ioctl(4): the terminal is another session's (the caller's
            # own, shared through stdin=None); with 0 as its argument the
            # call never steals it, even with CAP_SYS_ADMIN.
            pass


def set_resource_limits(state: State, step: steps.SetResourceLimits) -> None:
    """setrlimit(2) for each limit."""
    for limit, soft, hard in step.limits:
        resource.setrlimit(limit, (soft, hard))


def set_ids(state: State, step: steps.SetIds) -> None:
    """setgroups, setgid, setuid: setuid last, as the others need what it gives up."""
    if step.groups is not None:
        os.setgroups(list(step.groups))
    if step.gid is not None:
        os.setgid(step.gid)
    if step.uid is not None:
        os.setuid(step.uid)


def set_umask(state: State, step: steps.SetUmask) -> None:
    """Set the file creation mask."""
    os.umask(step.mask)


def set_no_new_privs(state: State, step: steps.SetNoNewPrivs) -> None:
    """prctl(PR_SET_NO_NEW_PRIVS): execve(2) no longer grants privileges."""
    _kernel.prctl(_kernel.PR_SET_NO_NEW_PRIVS, 1)


def keep_capabilities(state: State, step: steps.KeepCapabilities) -> None:
    """Make the four other sets what the bounding set kept."""
    assert state.kept is not None, "the plan puts LimitBoundingSet first"
    keep_only(state.kept)


def load_seccomp(state: State, step: steps.LoadSeccomp) -> None:
    """Install the compiled filter; it holds across execve(2)."""
    install_filter(step.program)


def run_callable_step(state: State, step: steps.RunCallable) -> None:
    """Call the callable of a slot (the populate hook)."""
    hook = state.objects[step.slot]
    assert callable(hook)
    hook()


def _root_fds(state: State, send_root: bool) -> list[int]:
    """Close what the steps left open (host fds among them); return the root's fd if asked."""
    for fd in state.slots.values():
        os.close(fd)
    state.slots.clear()
    return [os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)] if send_root else []


def exec_step(state: State, step: steps.Exec) -> NoReturn:
    """Report "execing", then exec. An exec that fails raises, to be reported as this step's."""
    report(state.handshake, Execing(), _root_fds(state, step.send_root))
    # The handshake socket is close-on-exec: its end-of-file tells the
    # caller that this exec succeeded.
    try:
        env = dict(step.env)
        if step.listen_pid:
            env["LISTEN_PID"] = str(os.getpid())
        os.execvpe(step.argv[0], list(step.argv), env)
    except OSError as exc:
        # As subprocess reports it: the program as it was given, not the
        # last PATH entry execvpe happened to try.
        raise OSError(exc.errno, exc.strerror, step.argv[0]) from None


def call_step(state: State, step: steps.Call) -> NoReturn:
    """Report "ready", then call the target (Guix's call-with-clean-exit)."""
    os.environ.clear()
    os.environ.update(dict(step.env))
    root = _root_fds(state, step.send_root)
    report(state.handshake, Ready(), root)
    state.handshake.close()
    for fd in root:
        os.close(fd)
    run_callable(state.objects[step.slot])


RUNNERS: dict[type[steps.Step], object] = {
    steps.Unshare: unshare,
    steps.LoadCallable: load_callable,
    steps.InstallStdio: install_stdio,
    steps.SetHostname: set_hostname,
    steps.BringLoopbackUp: bring_loopback_up,
    steps.Chdir: chdir,
    steps.InstallPassedFds: install_passed_fds,
    steps.StartInit: start_init,
    steps.LimitBoundingSet: limit_bounding_set_step,
    steps.StartSession: start_session,
    steps.SetResourceLimits: set_resource_limits,
    steps.SetIds: set_ids,
    steps.SetUmask: set_umask,
    steps.SetNoNewPrivs: set_no_new_privs,
    steps.KeepCapabilities: keep_capabilities,
    steps.LoadSeccomp: load_seccomp,
    steps.RunCallable: run_callable_step,
    steps.Exec: exec_step,
    steps.Call: call_step,
}
"""The runner of each process step."""
