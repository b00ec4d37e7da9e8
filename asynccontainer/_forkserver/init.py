"""The service steps Shepherd's exec-command takes in the container, and a tiny init.

Synchronous, run in the container process (see `_child`): Shepherd's
make-forkexec-constructor/container, after the container is set up, resets
signals (done for every container), creates /var/run, deletes a stale PID
file, then exec-command does setsid, setrlimit, chdir, the environment,
stdio, setgroups/setgid/setuid and umask before exec.
"""

from __future__ import annotations

import os
import resource
import signal
from typing import NoReturn

from .._plan import ServiceConfig

__all__ = ["apply_service_process_state", "prepare_service_root", "run_init"]

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


def prepare_service_root(service: ServiceConfig) -> None:
    """Create /var/run and delete a stale PID file (Shepherd's clean-up).

    Runs before the root turns read-only, so /var/run can be made in it.

    Raises:
        OSError: other than "no such file" for the stale PID file.
    """
    os.makedirs("/var/run", mode=0o755, exist_ok=True)
    if service.pid_file is not None:
        try:
            os.unlink(service.pid_file)
        except FileNotFoundError:
            pass


def apply_service_process_state(service: ServiceConfig) -> None:
    """Do exec-command's steps on this process: session, limits, directory, ids, umask.

    Order matters: setgroups and setgid need the privileges that setuid
    gives up, so setuid comes last (setuid(2), setgroups(2)).

    Raises:
        OSError: the failing step's error (chdir's FileNotFoundError for a
            directory missing in the container, EPERM for ids the user
            namespace does not map ...).
    """
    # A session (and process group) of its own: stop signals the group, and
    # the daemon cannot take over the caller's terminal.
    os.setsid()
    for limit, soft, hard in service.rlimits:
        resource.setrlimit(limit, (soft, hard))
    os.chdir(service.directory)
    if service.groups is not None:
        os.setgroups(list(service.groups))
    if service.gid is not None:
        os.setgid(service.gid)
    if service.uid is not None:
        os.setuid(service.uid)
    if service.umask is not None:
        os.umask(service.umask)


def run_init(target: int | None) -> NoReturn:
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
    signal it sends itself.
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
        os._exit(128 + os.WTERMSIG(last_status))
    os._exit(os.waitstatus_to_exitcode(last_status))
