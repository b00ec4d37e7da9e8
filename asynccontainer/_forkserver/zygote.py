"""A zygote: a clone of the fork server waiting for its go, then a container or an excursion.

It runs in a copy of the fork server (single-threaded, so the copy is
sound), never returns, and always ends in exec or `os._exit`: nothing of
the server's state may run again here, not even its finalizers. Once the
server has written its id maps (and cgroups, and veth) it sends the go
with the handshake socket; the caller sends the plan on that socket.
"""

from __future__ import annotations

# Everything the container process uses is imported here, when the server
# starts: after pivot_root the host's standard library is out of reach.
import os
import signal
import socket
from typing import NoReturn

from .. import _kernel
from .._plan.steps import ContainerPlan, ExcursionPlan
from .._wire import ContainerSetup, ExcursionSetup, FrameBuffer, recv_frame, recvmsg_fds
from .excursion import run_excursion
from .executor import run_plan
from .target import EXIT_PARENT_DIED

__all__ = ["container_main"]

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


def _wait_for_go(go_fd: int) -> int:
    """Wait for the server's go; return the handshake fd it brings. Exits on anything else."""
    try:
        _reset_process_state()
        # Die with the server; and since PR_SET_PDEATHSIG is not inherited
        # across fork, a container with a pid namespace takes its whole
        # namespace down with it (its PID 1 dying kills the rest).
        _kernel.prctl(_kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        _close_fds_except({go_fd})
        _kernel.set_process_name("ac-zygote")
        # Wait until the server has written the id maps (Guix's "ready")
        # and handed over the handshake socket. End-of-file means the
        # server died or gave up on us.
        go = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, go_fd)
        data, fds, lost = recvmsg_fds(go, 16)
        go.close()
        if data != b"g" or len(fds) != 1 or lost:
            os._exit(EXIT_PARENT_DIED)
        _kernel.set_process_name("ac-container")
        return fds[0]
    except BaseException:
        os._exit(EXIT_PARENT_DIED)


def container_main(go_fd: int) -> NoReturn:
    """Wait for the go, receive the plan, and run it: a container's set-up, or an excursion.

    Never returns: the process execs the command, or exits with the
    callable's status (0, or 1 after printing its traceback), or with
    EXIT_PARENT_DIED, EXIT_SETUP_FAILED or EXIT_EXEC_FAILED.
    """
    # Family and type given, or socket() would ask the kernel for them.
    handshake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, _wait_for_go(go_fd))
    try:
        message, fds = recv_frame(handshake, FrameBuffer())
    except BaseException:
        os._exit(EXIT_PARENT_DIED)
    if isinstance(message, ContainerSetup) and isinstance(message.plan, ContainerPlan):
        run_plan(handshake, message.plan, fds)
    if isinstance(message, ExcursionSetup) and isinstance(message.plan, ExcursionPlan):
        run_excursion(handshake, message.plan, fds)
    os._exit(EXIT_PARENT_DIED)
