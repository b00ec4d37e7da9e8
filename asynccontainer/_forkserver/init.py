"""A tiny init, PID 1 of a container's pid namespace (the plan's StartInit step)."""

from __future__ import annotations

import os
import signal
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


def run_init(target: int | None, status_fd: int = -1) -> NoReturn:
    """Be PID 1 of a pid namespace: reap every orphan and relay signals.

    A process that is PID 1 receives only the signals it has a handler for
    (pid_namespaces(7)), so a plain command there ignores SIGTERM and a
    terminal's Ctrl-C; and when PID 1 exits, the kernel kills the rest of
    the namespace. This init takes the place, as Guix's child-is-pid1? #f
    and tini do, in one of two ways:

    - `target` given (a container's target): the relayed signals go to the
      target, and the init exits when the target does, with its status;
    - `target` None (a service): a daemon forks and its parent exits, so the
      init stays while any process is left, relays the signals to all of
      them (kill(-1) from PID 1 reaches every process but itself, kill(2)),
      and exits with the status of the last one.

    Either way a signal's death is reported as 128+N: PID 1 cannot die of a
    signal it sends itself. N also goes, as one byte, to `status_fd` (a
    pipe to the caller, if not -1), which then reports -N.
    """

    def relay(signum: int, frame: object) -> None:
        try:
            os.kill(-1 if target is None else target, signum)
        except ProcessLookupError:
            pass

    for sig in RELAYED_SIGNALS:
        signal.signal(sig, relay)
    last_status = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if target is None or pid == target:
            last_status = status
            if pid == target:
                break
    if os.WIFSIGNALED(last_status):
        if status_fd >= 0:
            try:
                os.write(status_fd, bytes([os.WTERMSIG(last_status)]))
            except OSError:
                pass  # the caller is gone: nobody reads it
        os._exit(128 + os.WTERMSIG(last_status))
    os._exit(os.waitstatus_to_exitcode(last_status))
