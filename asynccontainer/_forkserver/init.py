"""A tiny init, PID 1 of a container's pid namespace (the plan's StartInit step)."""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

__all__ = ["run_init"]

# Signals the init passes on to every process of its pid namespace; the
# set Guix's and tini's inits relay.
RELAYED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGQUIT,
)


def run_init(target: int, status_fd: int = -1, *, stay: bool = False) -> NoReturn:
    """Be PID 1 of a pid namespace: reap every orphan and relay signals.

    A process that is PID 1 receives only the signals it has a handler for
    (pid_namespaces(7)), so a plain command there ignores SIGTERM and a
    terminal's Ctrl-C; and when PID 1 exits, the kernel kills the rest of
    the namespace. This init takes the place, as Guix's child-is-pid1? #f
    and tini do, in one of two ways, `target` being the command's PID:

    - following (a container's target): the relayed signals go to the
      target, and the init exits when the target does;
    - `stay` (a service): a daemon forks and its parent exits, so the init
      stays while any process is left, relays the signals to all of them
      (kill(-1) from PID 1 reaches every process but itself, kill(2)).

    Either way the init exits with the target's status, a signal's death
    as 128+N: PID 1 cannot die of a signal it sends itself. Following, N
    also goes, as one byte, to `status_fd` (a pipe to the caller, if not
    -1), which then reports -N; staying, the target's wait status goes
    there (4 bytes, native order) as soon as it is reaped, which tells
    the caller that a service's main process ended.
    """

    def relay(signum: int, frame: object) -> None:
        try:
            os.kill(-1 if stay else target, signum)
        except ProcessLookupError:
            pass

    for sig in RELAYED_SIGNALS:
        signal.signal(sig, relay)
    # A caller gone makes a write fail, not kill PID 1.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    last_status = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid != target:
            continue
        last_status = status
        if not stay:
            break
        _report(status_fd, status.to_bytes(4, sys.byteorder, signed=True))
    if os.WIFSIGNALED(last_status):
        if not stay:
            _report(status_fd, bytes([os.WTERMSIG(last_status)]))
        os._exit(128 + os.WTERMSIG(last_status))
    os._exit(os.waitstatus_to_exitcode(last_status))


def _report(status_fd: int, data: bytes) -> None:
    if status_fd < 0:
        return
    try:
        os.write(status_fd, data)
    except OSError:
        pass  # the caller is gone: nobody reads it
