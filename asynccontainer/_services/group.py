"""Services in containers: Shepherd's make-forkexec-constructor/container, structured.

A `ServiceSpec` says what to run and how; `ServiceGroup.start` runs it in a
container, waits until it is ready (its PID file names a live process, or
its container is set up), logs its output, respawns it if asked, and stops
it (SIGTERM, then SIGKILL after the grace period) when the group's block is
left in any way: normally, by an exception, or by a cancellation.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import time
from types import TracebackType
from typing import Any, Self

import anyio

from .. import _kernel
from .._core.container import _REAP_TIMEOUT, Container, _StdioFds, spawn
from .._core.pidfile import PidTranslator, wait_for_pid_file
from .._errors import ContainerError, ServiceStartError
from .._forkserver.init import RELAYED_SIGNALS
from .._plan.build import plan_container
from .._spec.limits import ResourceUsage
from .._spec.network import VethNetwork
from .directories import make_directories, remove_runtime_directories
from .logs import LineLogger, open_log_file
from .spec import DIRECTORY_BASES, ServiceSpec, service_extras

__all__ = ["Service", "ServiceGroup"]

# How many lines of its output a service keeps (`recent_log`), and how many
# of them a ServiceStartError shows.
RECENT_LINES = 100
LOG_LINES_IN_ERROR = 10


class Service:
    """A service started by `ServiceGroup.start`: its process, state and history.

    Not constructed directly: `ServiceGroup.start` returns one.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a Service is not constructed directly: ServiceGroup.start returns one")

    @classmethod
    def _of(cls, spec: ServiceSpec, group: ServiceGroup) -> Service:
        service = cls.__new__(cls)
        service._setup(spec, group)
        return service

    def _setup(self, spec: ServiceSpec, group: ServiceGroup) -> None:
        self.spec = spec
        self._group = group
        self._container: Container | None = None
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._root_fd: int | None = None
        self._returncode: int | None = None
        # Set by the watcher of the current process when all of it is gone.
        self._ended = anyio.Event()
        # Set when the current launch knows its PID (or failed to).
        self._settled = anyio.Event()
        self._finished = anyio.Event()
        self._supervisor_scope = anyio.CancelScope()
        self._deaths: collections.deque[float] = collections.deque()
        self._started_at: float | None = None
        self._restarts = 0
        self._disabled = False
        # Why the service's processes could not be followed to their end.
        self._lost: ContainerError | None = None
        self._state = "starting"
        # Its last lines of output, across respawns.
        self._recent: collections.deque[str] = collections.deque(maxlen=RECENT_LINES)
        self._logger: LineLogger | None = None
        # restart(): the supervisor starts it again once it is down, and sets this.
        self._restart: anyio.Event | None = None
        self._stopping = False

    @property
    def restarts(self) -> int:
        """How many times the service was respawned (after a death, not by `restart`)."""
        return self._restarts

    @property
    def state(self) -> str:
        """What it is doing now, as a word.

        One of "starting", "running", "reloading", "stopping", "stopped",
        "failed" (it died, or could not start, and is not respawned) and
        "restarting".
        """
        return self._state

    @property
    def recent_log(self) -> list[str]:
        """Its last lines of output (100 at most), across respawns, oldest first."""
        return list(self._recent)

    def send_signal(self, sig: int) -> None:
        """Send signal `sig` to every process of the service; nothing once it is down.

        Race-free: through the pidfd of its init (which relays the signal
        to every process of the namespace) or of its processes, never by a
        PID that may have been reused. With a pid namespace, the init
        relays SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2 and SIGQUIT; any
        other signal goes to the main process alone.

        Raises:
            ValueError: `sig` is not a signal number.
        """
        if isinstance(sig, bool) or not isinstance(sig, int) or sig not in signal.valid_signals():
            raise ValueError(f"{sig!r} is not a signal number (signal.SIGHUP ...)")
        if self._container is None or self._ended.is_set():
            return
        if "pid" in self.spec.namespaces and sig not in RELAYED_SIGNALS:
            if self._pidfd is not None:
                try:
                    _kernel.pidfd_send_signal(self._pidfd, sig)
                except ProcessLookupError:
                    pass
            return
        self._signal_all(sig)

    async def reload(self) -> None:
        """Send the service its `reload_signal` (SIGHUP by default), as `systemctl reload`.

        Raises:
            RuntimeError: the service is not running.
        """
        if not self.running:
            raise RuntimeError(
                f"service {self.name!r} is {self._state}: there is nothing to reload"
            )
        self.send_signal(self.spec.reload_signal)
        await anyio.lowlevel.checkpoint()

    async def restart(self) -> None:
        """Stop the service (its stop signal, SIGKILL after the grace period) and start it again.

        Returns once it is started again, as `ServiceGroup.start` does.

        Raises:
            RuntimeError: the service is down for good (stopped, or not
                respawned): start a new one with `ServiceGroup.start`.
            ContainerError: it could not be started again (its
                `recent_log` says why); it is then down for good.
        """
        if self._finished.is_set() or self._stopping:
            raise RuntimeError(
                f"service {self.name!r} is {self._state}: start a new one with group.start"
            )
        restarted = self._restart = anyio.Event()
        self._state = "stopping"
        await self._terminate()
        await restarted.wait()
        if self._finished.is_set():
            raise ContainerError(
                f"service {self.name!r} could not be started again; see its recent_log"
            )

    @property
    def disabled(self) -> bool:
        """True once respawning was given up (it died too often)."""
        return self._disabled

    @property
    def name(self) -> str:
        """The spec's name."""
        return self.spec.name

    @property
    def pid(self) -> int | None:
        """The host PID of the service (its PID file's process, else its command's)."""
        return self._pid

    @property
    def running(self) -> bool:
        """True while the service's process runs."""
        return self._pid is not None and not self._ended.is_set() and _alive(self._pid)

    @property
    def returncode(self) -> int | None:
        """None until the service is down for good; then its last exit status."""
        return self._returncode if self._finished.is_set() else None

    @property
    def uptime(self) -> float:
        """Seconds since the service's current process started; 0 when not running."""
        if self._started_at is None or not self.running:
            return 0.0
        return time.monotonic() - self._started_at

    @property
    def network(self) -> VethNetwork | None:
        """The current run's veth pair, with `network="veth"` in its spec; else None."""
        return None if self._container is None else self._container.network

    @property
    def usage(self) -> ResourceUsage | None:
        """What the last run used (CPU time, memory peak, OOM kills), once it ended.

        None while it runs, and without `limits=` in its spec.
        """
        return None if self._container is None else self._container.usage

    def __repr__(self) -> str:
        state = "running" if self.running else ("disabled" if self.disabled else "stopped")
        return f"<Service {self.name!r} pid={self._pid} {state}>"

    def _stopped_state(self) -> str:
        """Return the state of a service down for good: stopped by us, or failed on its own."""
        if self._stopping:
            return "stopped"
        return "stopped" if self._returncode == 0 and not self._disabled else "failed"

    async def wait(self) -> int:
        """Wait until the service is down for good (stopped, or dead and not respawned).

        Returns:
            Its last exit status (with a pid namespace, the status of its
            last process): -N for a signal, as for a container.
        """
        await self._finished.wait()
        assert self._returncode is not None
        return self._returncode

    async def stop(self) -> int:
        """Stop the service: SIGTERM to all its processes, SIGKILL after the grace period.

        Returns once every process of the service is gone, with its exit
        status. A service already down just returns it. Respawning ends.

        Cancellation: the stop goes on to its end, shielded.
        """
        self._supervisor_scope.cancel()
        self._stopping = True
        with anyio.CancelScope(shield=True):
            if not self._finished.is_set():
                self._state = "stopping"
                await self._terminate()
                self._finish()
        return await self.wait()

    # -- internals --------------------------------------------------------------

    def _set_root(self, fd: int | None) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
        self._root_fd = fd

    def _finish(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._set_root(None)
        if not self._finished.is_set():
            # As systemd's RuntimeDirectory=: gone when the service is.
            remove_runtime_directories(self.spec.runtime_directories)
            self._state = self._stopped_state()
        self._finished.set()
        if self._restart is not None:
            self._restart.set()

    async def _launch(self) -> None:
        """Start a container for the spec and wait until the service is ready.

        Cancellation or failure: whatever was started is stopped first.
        """
        spec = self.spec
        extras = service_extras(spec)
        plan, request = plan_container(spec.container_spec(), list(spec.command), extras=extras)
        for field, base in DIRECTORY_BASES.items():
            for name in getattr(spec, field):
                make_directories(base, name, extras.uid, extras.gid)
        log_fd = None
        if spec.log_file is not None:
            log_fd = open_log_file(spec.log_file, extras.uid, extras.gid)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        logger = self._logger = LineLogger(read_fd, log_fd, spec.name, self._recent)
        stdio = _StdioFds()
        try:
            stdio.add("stdin", 0, subprocess.DEVNULL)
            stdio.add("stdout", 1, write_fd)
            stdio.add("stderr", 2, write_fd)
            container, root = await spawn(plan, request, [*stdio.fds, *spec.pass_fds])
        except BaseException:
            logger.close()
            raise
        finally:
            stdio.close()
            os.close(write_fd)
        self._group._run(logger.run, f"log of {spec.name}", logger.done)
        self._container = container
        # The root stays reachable through it after the container's first
        # process exits, which a forking daemon's parent does.
        self._set_root(root)
        self._pid = None
        self._returncode = None
        self._ended = anyio.Event()
        self._settled = anyio.Event()
        self._group._run(self._watch, f"watch of {spec.name}", None)
        try:
            pid = await self._ready(container)
            self._pid = pid
            try:
                self._pidfd = _kernel.pidfd_open(pid)
            except ProcessLookupError:
                # Started, and already gone (a command that exits at once):
                # the watcher sees the end, and the supervisor takes it from
                # there, as for any death.
                self._pidfd = None
        except BaseException:
            self._settled.set()
            with anyio.CancelScope(shield=True):
                await self._terminate()
            self._set_root(None)
            raise
        self._settled.set()
        self._started_at = time.monotonic()
        self._state = "running"

    async def _ready(self, container: Container) -> int:
        """Return the service's host PID once it is ready."""
        spec = self.spec
        if spec.pid_file is None:
            return _main_process(container, init="pid" in spec.namespaces)
        pid_file = spec.pid_file

        async def read() -> int:
            # With a pid namespace the init lives as long as the service,
            # and its namespace is the one to translate from (ProcessLookupError
            # if it has ended already); without one, PIDs are the host's.
            translate = PidTranslator(container.pid if "pid" in spec.namespaces else None)
            root = None if self._root_fd is None else os.dup(self._root_fd)
            return await wait_for_pid_file(
                pid_file,
                timeout=spec.pid_file_timeout,
                root_fd=root,
                translate=translate,
                where=f" of service {spec.name!r}",
            )

        if "pid" not in spec.namespaces:
            return await read()

        # With an init, the container ending means the service died before
        # writing its PID file: no use waiting for the timeout.
        outcome: list[int | BaseException] = []
        async with anyio.create_task_group() as race:

            async def reader() -> None:
                try:
                    outcome.append(await read())
                except ProcessLookupError:
                    return  # the init has ended: died() says so, with the status
                except Exception as exc:
                    outcome.append(exc)
                race.cancel_scope.cancel()

            async def died() -> None:
                await self._ended.wait()
                when = f"before its PID file {spec.pid_file} named a live process"
                outcome.append(await self._start_error(when))
                race.cancel_scope.cancel()

            race.start_soon(reader)
            race.start_soon(died)
        first = outcome[0]
        if isinstance(first, BaseException):
            raise first
        return first

    async def _start_error(self, when: str) -> ServiceStartError:
        """Return the error of a service whose processes all ended `when`, with its last lines."""
        if self._logger is not None:
            # Its output ends with it: the last lines are on their way.
            with anyio.move_on_after(1):
                await self._logger.done.wait()
        returncode = self._returncode if self._returncode is not None else -signal.SIGKILL
        log = list(self._recent)[-LOG_LINES_IN_ERROR:]
        return ServiceStartError(self.name, returncode, log, when)

    async def _watch(self) -> None:
        """Set `_ended` once every process of the current launch is gone (also if this fails)."""
        container = self._container
        assert container is not None
        ended = self._ended
        try:
            try:
                self._returncode = await container.wait()
            except ContainerError as exc:
                # The fork server died; the container died with it
                # (PR_SET_PDEATHSIG), and wait() says -SIGKILL.
                self._returncode = container.returncode
                self._lost = exc
            if "pid" not in self.spec.namespaces:
                # Without a pid namespace, a daemon outlives its container's
                # first process: follow it too, through its pidfd, which turns
                # readable when it exits (pidfd_open(2)).
                await self._settled.wait()
                if self._pidfd is not None and self._pid != container.pid:
                    await anyio.wait_readable(self._pidfd)
        finally:
            # The service is down: what its processes forked and left in its
            # cgroup goes with it (as systemd's KillMode=control-group).
            with anyio.CancelScope(shield=True):
                await container._end_remains()
            ended.set()

    async def _terminate(self) -> None:
        """SIGTERM every process of the service, SIGKILL after the grace period, wait."""
        if self._container is None:
            return
        self._signal_all(self.spec.stop_signal)
        with anyio.move_on_after(self.spec.grace_period):
            await self._ended.wait()
            return
        self._signal_all(signal.SIGKILL)
        # Bounded: SIGKILL ends any process; past this something outside
        # (a wedged fork server, a stopped tracer) keeps it, and waiting
        # longer helps nobody.
        with anyio.move_on_after(_REAP_TIMEOUT):
            await self._ended.wait()
            return
        self._lost = ContainerError(
            f"service {self.name!r} did not end within {_REAP_TIMEOUT} s of SIGKILL; "
            "look for a process of it stopped by a debugger, or a wedged fork server"
        )

    def _signal_all(self, sig: int) -> None:
        container = self._container
        assert container is not None
        if "pid" in self.spec.namespaces:
            # The init relays SIGTERM to every process of the namespace;
            # SIGKILL of the init takes the namespace down with it.
            container.send_signal(sig)
            return
        # Without a pid namespace: the service's process group (it called
        # setsid, so the group is its first process's PID), and the daemon
        # named by the PID file in case it left the group.
        try:
            os.killpg(container.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        container.send_signal(sig)
        if self._pidfd is not None:
            try:
                _kernel.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    async def _supervise(self) -> None:
        """Wait for the service to die; respawn it, or mark it finished."""
        logger = logging.getLogger(f"asynccontainer.service.{self.name}")
        with self._supervisor_scope:
            while True:
                await self._ended.wait()
                restarting = self._restart
                if restarting is None and not self.spec.respawn:
                    self._finish()
                    return
                if restarting is None and self._throttled():
                    self._disabled = True
                    starts, period = self.spec.respawn_limit
                    logger.error(
                        "service %r died more than %d times in %g seconds: respawning disabled",
                        self.name,
                        starts,
                        period,
                    )
                    self._finish()
                    return
                self._state = "restarting"
                if restarting is None:
                    logger.warning(
                        "service %r exited with status %s; respawning", self.name, self._returncode
                    )
                    # Shepherd 0.10.3's respawn delay: a crash loop costs time, not a core.
                    await anyio.sleep(self.spec.respawn_delay)
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
                self._restart = None
                try:
                    await self._launch()
                except Exception as exc:
                    # A failed start counts as a death, so the throttle ends this.
                    logger.error("respawning service %r failed: %s", self.name, exc)
                    if restarting is not None:
                        self._finish()
                        restarting.set()
                        return
                    continue
                if restarting is None:
                    self._restarts += 1
                else:
                    restarting.set()

    def _throttled(self) -> bool:
        """Record a death; return True if there were too many lately (Shepherd's rule)."""
        now = time.monotonic()
        self._deaths.append(now)
        starts, period = self.spec.respawn_limit
        while now - self._deaths[0] > period:
            self._deaths.popleft()
        return len(self._deaths) > starts


def _main_process(container: Container, *, init: bool) -> int:
    """Return the service command's host PID: the container's first, or its init's child.

    A command that has exited already leaves the init's own PID (or, if
    the init is gone too, the container's, whose pidfd then cannot be
    opened): either way the service has ended, as its watcher will see.
    """
    if init:
        try:
            with open(f"/proc/{container.pid}/task/{container.pid}/children") as children:
                pids = children.read().split()
        except FileNotFoundError:
            pids = []
        if pids:
            return int(pids[0])
    return container.pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


class ServiceGroup:
    """Runs services for the length of an `async with` block, and stops them all after it.

    Leaving the block (normally, by an exception, or by a cancellation such
    as `anyio.fail_after` around it) stops every service the group started,
    concurrently, each within its grace period; nothing survives the block.
    `start` may be called from many tasks at once.
    """

    def __init__(self) -> None:
        self._services: list[Service] = []
        self._starts: dict[anyio.CancelScope, anyio.Event] = {}
        self._log_done: list[anyio.Event] = []
        self._helper_scopes: list[anyio.CancelScope] = []
        self._entered = False
        self._closed = False

    def _run(self, function: Any, name: str, done: anyio.Event | None) -> None:
        """Run a helper task (logger, watcher, supervisor) in the group's task group.

        It is shielded: a cancellation of the block around the group must
        not reach the watchers, since stopping the services waits for them.
        The group cancels these tasks itself, last.
        """
        if done is not None:
            self._log_done.append(done)
        scope = anyio.CancelScope(shield=True)
        self._helper_scopes.append(scope)

        async def shielded() -> None:
            with scope:
                await function()

        self._task_group.start_soon(shielded, name=name)

    @property
    def services(self) -> tuple[Service, ...]:
        """The services started so far, in order."""
        return tuple(self._services)

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a ServiceGroup can be entered only once")
        self._entered = True
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._closed = True
        with anyio.CancelScope(shield=True):
            # Starts in progress stop what they started (their own clean-up
            # path) once cancelled; wait for that first.
            for start in list(self._starts):
                start.cancel()
            with anyio.move_on_after(_REAP_TIMEOUT):
                for settled in list(self._starts.values()):
                    await settled.wait()
            # Service.stop cannot fail: it only signals and waits.
            async with anyio.create_task_group() as stoppers:
                for service in self._services:
                    stoppers.start_soon(service.stop)
            # Loggers end at end-of-file once every process is gone; give
            # them a moment to write the last lines, then cancel the rest.
            with anyio.move_on_after(5):
                for done in self._log_done:
                    await done.wait()
            for scope in self._helper_scopes:
                scope.cancel()
        self._task_group.cancel_scope.cancel()
        # The helpers are done, and the task group has nothing of the
        # block's to report: whatever ends the block (its exception, or a
        # cancellation from outside) then propagates as it is, not wrapped
        # in an exception group.
        await self._task_group.__aexit__(None, None, None)
        lost = next((service._lost for service in self._services if service._lost), None)
        if exc is None and lost is not None:
            raise lost
        return None

    async def start(self, spec: ServiceSpec) -> Service:
        """Start a service and return it once it is ready.

        Ready means: with `pid_file`, the file names a live process (whose
        host PID becomes `service.pid`); otherwise the container is set up
        and the command exec'd.

        Raises:
            PidFileTimeoutError: (a TimeoutError) the PID file did not name
                a live process within `pid_file_timeout`; every process of
                the service was killed.
            UnknownAccountError: an unknown user or group, before spawning.
            OSError: a set-up step failed (a missing `directory`, a log file
                that cannot be created, a command that does not exist ...).
            ContainerError: with `pid_file` and a pid namespace, the service
                exited before its PID file named a live process.
            RuntimeError: the group is not entered, or already left.

        Cancellation: a service half-started is stopped first.
        """
        if not isinstance(spec, ServiceSpec):
            raise TypeError(f"start() takes a ServiceSpec, not {spec!r}")
        if not self._entered or self._closed:
            raise RuntimeError("start services inside 'async with ServiceGroup() as group:'")
        service = Service._of(spec, self)
        # The group's exit cancels starts in progress (and waits for them),
        # so that no container outlives it unowned.
        scope = anyio.CancelScope()
        settled = anyio.Event()
        self._starts[scope] = settled
        try:
            with scope:
                await service._launch()
        finally:
            del self._starts[scope]
            settled.set()
        if self._closed:
            if not scope.cancelled_caught:
                await service.stop()  # started just as the group was left
            raise RuntimeError(
                f"the service group was left while service {spec.name!r} started; "
                "it was stopped: start services inside the group's block"
            )
        self._services.append(service)
        self._run(service._supervise, f"supervisor of {spec.name}", None)
        return service
