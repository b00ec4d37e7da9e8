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

from ._config import ServiceConfig

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


def run_init() -> NoReturn:
    """Be PID 1 of the service's pid namespace until no other process is left.

    A daemon forks and its parent exits; if that parent were PID 1, the
    kernel would kill the whole namespace with it (pid_namespaces(7)). This
    init stays instead, reaps every orphan the namespace hands it, and
    relays the stop signals to every process of the namespace (kill(-1)
    from PID 1 reaches all of them but itself, kill(2)). It exits when it
    has no child left, with the status of the last one to exit (128+N for
    a signal: PID 1 cannot re-raise a signal on itself).
    """

    def relay(signum: int, frame: object) -> None:
        try:
            os.kill(-1, signum)
        except ProcessLookupError:
            pass

    for sig in RELAYED_SIGNALS:
        signal.signal(sig, relay)
    last_status = 0
    while True:
        try:
            _, last_status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
    if os.WIFSIGNALED(last_status):
        os._exit(128 + os.WTERMSIG(last_status))
    os._exit(os.waitstatus_to_exitcode(last_status))
