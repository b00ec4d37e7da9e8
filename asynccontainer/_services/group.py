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
import math
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .. import _kernel
from .._core.container import _REAP_TIMEOUT, Container, _StdioFds, spawn
from .._core.pidfile import PidTranslator, wait_for_pid_file
from .._errors import ContainerError, ServiceStartError
from .._forkserver.init import RELAYED_SIGNALS
from .._plan.build import Extras, plan_container
from .._spec.limits import ResourceUsage
from .._spec.network import VethNetwork
from .directories import make_directories, remove_runtime_directories
from .endpoint import bind_all, close_all
from .inetd import ConnectionServer, readable_any
from .logs import LineLogger, Rotation, open_log_file
from .notify import NotifySocket
from .order import check_order
from .spec import DIRECTORY_BASES, ServiceSpec, service_extras

__all__ = ["Service", "ServiceEvent", "ServiceEvents", "ServiceGroup"]

_T = TypeVar("_T")

# How many lines of its output a service keeps (`recent_log`), and how many
# of them a ServiceStartError shows.
RECENT_LINES = 100
LOG_LINES_IN_ERROR = 10
# The longest STATUS= text kept (systemd shows one line of it).
MAX_STATUS = 200
# States in which `ServiceEvent.returncode` is the last exit status.
_ENDED_STATES = ("stopped", "failed", "restarting")


@attrs.frozen
class ServiceEvent:
    """A change of a service's state, as `ServiceGroup.events` yields it.

    Attributes:
        service: the `Service` that changed.
        state: its new `Service.state`.
        time: when, as time.time() (seconds since the epoch).
        returncode: its last exit status when the state is "stopped",
            "failed" or "restarting"; else None.
    """

    service: Service
    state: str
    time: float
    returncode: int | None


class ServiceEvents:
    """The `ServiceEvent` items of a group, as `ServiceGroup.events` returns them.

    An async iterator (``async for event in events``) that ends when the
    group is left and its services are down; also an async context manager
    and `close()`, to stop listening before that.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("ServiceEvents is not constructed directly: group.events() returns one")

    @classmethod
    def _of(cls, receive: MemoryObjectReceiveStream[ServiceEvent]) -> ServiceEvents:
        events = cls.__new__(cls)
        events._receive = receive
        return events

    _receive: MemoryObjectReceiveStream[ServiceEvent]

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ServiceEvent:
        """Return the next event; the next after a cancellation, none lost."""
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._receive.close()
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop listening: the iteration ends, and the group keeps nothing more for it."""
        self._receive.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        receive = getattr(self, "_receive", None)
        if receive is not None:
            receive.close()


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
        # The state last told to the group's listeners.
        self._announced: str | None = None
        # sd_notify: its socket (for the service's life), the task reading
        # it, the last STATUS=, READY=1 of the current launch, and the
        # reload in progress (set by READY=1 after RELOADING=1).
        self._notify: NotifySocket | None = None
        self._notify_scope: anyio.CancelScope | None = None
        self._status_text = ""
        self._ready_event = anyio.Event()
        self._reloaded: anyio.Event | None = None
        self._reload_seen = False
        # Cancelled when MAINPID= names another main process, which the
        # watcher then follows; the pidfds it no longer needs wait here.
        self._main_scope = anyio.CancelScope()
        self._old_pidfds: list[int] = []
        self._translator: PidTranslator | None = None
        # When the current launch began, in clock ticks since boot (see
        # `_check_started_since`).
        self._launched = 0
        # Sockets the caller listens on for it (`sockets`), and with
        # `accept` the server of its connections and its log pipe's write end.
        self._listening: list[socket.socket] = []
        self._server: ConnectionServer | None = None
        self._accept_log: int | None = None
        self._supervisor_done: anyio.Event | None = None
        # With a pid namespace and neither a PID file nor MAINPID=, the main
        # process is the command, which the init tells the end of.
        self._main_is_command = False

    @property
    def restarts(self) -> int:
        """How many times a respawn was started (after a death, not by `restart`)."""
        return self._restarts

    @property
    def state(self) -> str:
        """What it is doing now, as a word.

        One of "starting", "running", "reloading", "stopping", "stopped",
        "failed" (it died, or could not start, and is not respawned),
        "restarting", and "listening" (`lazy_start` or `accept`: waiting
        for a connection; with `accept`, "running" while a connection's
        container runs).
        """
        return self._state

    @property
    def status_text(self) -> str:
        """The last STATUS= the service sent (notify=True), as printable text; "" before any."""
        return self._status_text

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

        With notify=True, returns once the service said READY=1 after
        RELOADING=1 (systemd's Type=notify-reload); else at once.

        Raises:
            RuntimeError: the service is not running.
            TimeoutError: with notify=True, READY=1 did not follow within
                `start_timeout`; the service is left running.

        Cancellation: the signal is sent; the wait for READY=1 ends.
        """
        if not self.running:
            raise RuntimeError(
                f"service {self.name!r} is {self._state}: there is nothing to reload"
            )
        if not self.spec.notify:
            self.send_signal(self.spec.reload_signal)
            await anyio.lowlevel.checkpoint()
            return
        done = self._reloaded = anyio.Event()
        self._reload_seen = False
        self.send_signal(self.spec.reload_signal)
        with anyio.move_on_after(self.spec.start_timeout):
            await done.wait()
            return
        raise TimeoutError(
            f"service {self.name!r} did not send RELOADING=1 then READY=1 within "
            f"{self.spec.start_timeout} s of its reload signal"
        )

    async def restart(self) -> None:
        """Stop the service (its stop signal, SIGKILL after the grace period) and start it again.

        Returns once it is started again, as `ServiceGroup.start` does.
        With `lazy_start`, returns once it is stopped: it starts again on
        the next connection.

        Raises:
            RuntimeError: the service is down for good (stopped, or not
                respawned): start a new one with `ServiceGroup.start`; or
                it has `accept`, whose containers are each a connection's.
            ContainerError: it could not be started again (its
                `recent_log` says why); it is then down for good.
        """
        if self._finished.is_set() or self._stopping or self.spec.accept:
            what = "accepts connections" if self.spec.accept else f"is {self._state}"
            raise RuntimeError(
                f"service {self.name!r} {what}: there is nothing to restart; "
                "stop it, and start a new one with group.start"
            )
        if self.spec.lazy_start:
            self._set_state("stopping")
            await self._terminate()
            return
        restarted = self._restart = anyio.Event()
        self._set_state("stopping")
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
        return f"<Service {self.name!r} pid={self._pid} {self._state}>"

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
        status. A service already down just returns it. Respawning ends;
        with `accept`, every connection's container is stopped so.

        Cancellation: the stop goes on to its end, shielded.
        """
        self._supervisor_scope.cancel()
        self._stopping = True
        with anyio.CancelScope(shield=True):
            if self._supervisor_done is not None:
                # It may be waiting on the sockets, or stopping connections.
                await self._supervisor_done.wait()
            if not self._finished.is_set():
                self._set_state("stopping")
                await self._terminate()
                self._finish()
        return await self.wait()

    # -- internals --------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        """Record a change of state and tell the group's listeners (`ServiceEvent`)."""
        self._state = state
        if state == self._announced:
            return
        self._announced = state
        returncode = self._returncode if state in _ENDED_STATES else None
        self._group._announce(ServiceEvent(self, state, time.time(), returncode))

    def _set_root(self, fd: int | None) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
        self._root_fd = fd

    def _forget_process(self) -> None:
        """Close the pidfds of the ended launch's main processes."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        while self._old_pidfds:
            os.close(self._old_pidfds.pop())

    def _finish(self) -> None:
        self._forget_process()
        self._set_root(None)
        self._close_notify()
        close_all(self.spec.sockets, self._listening)
        if self._accept_log is not None:
            os.close(self._accept_log)
            self._accept_log = None
        if self._returncode is None:
            self._returncode = 0  # never started (lazy_start, accept): nothing failed
        if not self._finished.is_set():
            # As systemd's RuntimeDirectory=: gone when the service is.
            remove_runtime_directories(self.spec.runtime_directories)
            self._set_state(self._stopped_state())
        self._finished.set()
        if self._restart is not None:
            self._restart.set()

    async def _launch(self) -> None:
        """Start a container for the spec and wait until the service is ready.

        Cancellation or failure: whatever was started is stopped first.
        """
        spec = self.spec
        self._set_state("starting")
        if spec.notify and self._notify is None:
            # One socket for the service's life, across respawns (as systemd's).
            self._notify = NotifySocket()
            self._notify_scope = self._group._run(self._listen, f"notify of {spec.name}", None)
        notify_path = None if self._notify is None else self._notify.path
        extras = service_extras(spec, notify_path)
        plan, request = plan_container(
            spec.container_spec(notify_socket=notify_path), list(spec.command), extras=extras
        )
        logger, write_fd = self._prepare(extras)
        self._launched = _boot_ticks()
        stdio = _StdioFds()
        try:
            stdio.add("stdin", 0, subprocess.DEVNULL)
            stdio.add("stdout", 1, write_fd)
            stdio.add("stderr", 2, write_fd)
            listening = [sock.fileno() for sock in self._listening]
            container, root = await spawn(plan, request, [*stdio.fds, *listening, *spec.pass_fds])
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
        self._ready_event = anyio.Event()
        self._main_scope = anyio.CancelScope()
        self._main_is_command = "pid" in spec.namespaces and spec.pid_file is None
        self._translator = None
        self._group._run(self._watch, f"watch of {spec.name}", None)
        try:
            if "pid" in spec.namespaces and (spec.notify or spec.pid_file is not None):
                # Both the notify socket's senders and the PID file's PID are
                # checked against its pid namespace.
                self._translator = await _translator_of(container)
            pid = await self._ready(container)
            if self._pid is None:  # not named by MAINPID= already
                self._pid = pid
                try:
                    self._pidfd = _kernel.pidfd_open(pid)
                except ProcessLookupError:
                    # Started, and already gone (a command that exits at
                    # once): the watcher sees the end, and the supervisor
                    # takes it from there, as for any death.
                    self._pidfd = None
        except BaseException:
            self._settled.set()
            with anyio.CancelScope(shield=True):
                await self._terminate()
            self._set_root(None)
            raise
        self._settled.set()
        self._started_at = time.monotonic()
        self._set_state("running")

    async def _ready(self, container: Container) -> int:
        """Return the service's host PID once it is ready."""
        spec = self.spec
        if spec.notify:
            return await self._wait_notified(container)
        if spec.pid_file is None:
            return _main_process(container, init="pid" in spec.namespaces)
        pid_file = spec.pid_file

        async def read() -> int:
            # With a pid namespace the init lives as long as the service,
            # and its namespace is the one to translate from (ProcessLookupError
            # if it has ended already); without one, PIDs are the host's.
            translate = PidTranslator(None)
            if "pid" in spec.namespaces:
                if self._translator is None:
                    raise ProcessLookupError(3, "the service's init has ended")
                translate = self._translator
            root = None if self._root_fd is None else os.dup(self._root_fd)
            return await wait_for_pid_file(
                pid_file,
                timeout=spec.start_timeout,
                root_fd=root,
                translate=translate,
                where=f" of service {spec.name!r}",
            )

        if "pid" not in spec.namespaces:
            pid = await read()
            _check_started_since(pid, self._launched, spec.name)
            return pid
        # With an init, the container ending means the service died before
        # writing its PID file: no use waiting for the timeout.
        return await self._race_death(read, f"before its PID file {pid_file} named a live process")

    async def _wait_notified(self, container: Container) -> int:
        """Return the main process's host PID once READY=1 came (notify=True)."""
        timeout = self.spec.start_timeout
        with anyio.move_on_after(timeout):
            await self._race_death(self._ready_event.wait, "before it sent READY=1")
        if not self._ready_event.is_set():
            raise TimeoutError(
                f"service {self.name!r} sent no READY=1 within start_timeout={timeout} s "
                "(its processes were killed); is it built with sd_notify, or told to use it?"
            )
        if self._pid is not None:
            return self._pid  # MAINPID= named it
        return _main_process(container, init=True)

    async def _race_death(self, ready: Callable[[], Awaitable[_T]], when: str) -> _T:
        """Return what `ready()` returns; raise ServiceStartError if every process ends first."""
        outcome: list[Any] = []
        async with anyio.create_task_group() as race:

            async def waiter() -> None:
                try:
                    outcome.append(await ready())
                except ProcessLookupError:
                    return  # the init has ended: died() says so, with the status
                except Exception as exc:
                    outcome.append(exc)
                race.cancel_scope.cancel()

            async def died() -> None:
                await self._ended.wait()
                outcome.append(await self._start_error(when))
                race.cancel_scope.cancel()

            race.start_soon(waiter)
            race.start_soon(died)
        first = outcome[0]
        if isinstance(first, BaseException):
            raise first
        return first  # type: ignore[no-any-return]

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
        """Set `_ended` once the current launch has ended (also if this fails).

        It has ended when its main process has (systemd's rule: what is
        left is stopped, as `_stop_rest` does), or when every process has.
        """
        container = self._container
        assert container is not None
        ended = self._ended
        try:
            if await self._follow(container):
                await self._stop_rest(container)
            status = await self._main_status(container)
            if status is not None:
                self._returncode = os.waitstatus_to_exitcode(status)
        finally:
            # The service is down: what its processes forked and left in its
            # cgroup goes with it (as systemd's KillMode=control-group).
            with anyio.CancelScope(shield=True):
                await container._end_remains()
            ended.set()

    async def _wait_container(self, container: Container) -> None:
        """Wait for the container's first process (its init, with "pid")."""
        try:
            self._returncode = await container.wait()
        except ContainerError as exc:
            # The fork server died; the container died with it
            # (PR_SET_PDEATHSIG), and wait() says -SIGKILL.
            self._returncode = container.returncode
            self._lost = exc

    async def _follow(self, container: Container) -> bool:
        """Wait until the launch ends; return True if its main process ended and others live."""
        main_ended = False
        done = False
        async with anyio.create_task_group() as race:

            async def whole() -> None:
                nonlocal done
                await self._wait_container(container)
                done = True
                if "pid" not in self.spec.namespaces:
                    # Without one, a daemon outlives its container's first
                    # process: main() follows it.
                    await self._settled.wait()
                    if self._pidfd is not None and self._pid != container.pid:
                        return
                race.cancel_scope.cancel()

            async def main() -> None:
                nonlocal main_ended
                await self._settled.wait()
                while True:
                    with self._main_scope:  # cancelled when MAINPID= names another
                        if not await self._main_exit(container):
                            return  # nothing to follow but the whole container
                        main_ended = True
                        race.cancel_scope.cancel()
                        return

            race.start_soon(whole)
            race.start_soon(main)
        return main_ended and not done

    async def _main_exit(self, container: Container) -> bool:
        """Wait until the main process exits; return False at once if it cannot be followed."""
        if self._main_is_command:
            # Its init writes on the status pipe as soon as it reaps the
            # command: no PID of it is needed, so none can be the wrong one.
            fd = container._target_dup()
            if fd is None:
                return False
            try:
                await anyio.wait_readable(fd)
            finally:
                os.close(fd)
            return True
        if self._pidfd is None:
            return False
        # A pidfd turns readable when its process exits (pidfd_open(2)).
        await anyio.wait_readable(self._pidfd)
        return True

    async def _stop_rest(self, container: Container) -> None:
        """Stop what outlives the main process: the stop signal, SIGKILL after the grace period."""
        self._signal_all(self.spec.stop_signal)
        with anyio.move_on_after(self.spec.grace_period):
            await self._wait_container(container)
            return
        self._signal_all(signal.SIGKILL)
        with anyio.move_on_after(_REAP_TIMEOUT):
            await self._wait_container(container)

    async def _main_status(self, container: Container) -> int | None:
        """Return the wait status of the ended main process, if it is not the container's own."""
        pidfd = self._pidfd
        if (
            pidfd is None
            or not self._settled.is_set()
            or self._main_is_command
            or self._pid == container.pid
        ):
            return None  # the container's returncode is the main process's
        status = _kernel.pidfd_exit_status(pidfd)
        if status is None and "pid" not in self.spec.namespaces:
            # With an init, every process is reaped by now; without one, the
            # daemon's parent (a subreaper, or the host's init) reaps it soon.
            with anyio.move_on_after(1):
                while status is None:
                    await anyio.sleep(0.01)
                    status = _kernel.pidfd_exit_status(pidfd)
        return status

    # -- sd_notify ----------------------------------------------------------------

    async def _listen(self) -> None:
        """Read the notify socket for the service's life, then close it."""
        notify = self._notify
        assert notify is not None
        try:
            async for fields in notify.messages(self._is_member):
                self._on_notify(fields)
        finally:
            notify.close()

    def _close_notify(self) -> None:
        """End the notify socket's reader, which closes the socket."""
        if self._notify_scope is not None:
            self._notify_scope.cancel()
            self._notify_scope = None

    def _is_member(self, pid: int) -> bool:
        """Return True if host PID `pid` is a process of the current launch's pid namespace."""
        translator = self._translator
        if translator is None or translator.namespace is None:
            return False
        try:
            theirs = os.stat(f"/proc/{pid}/ns/pid")
        except OSError:
            return False  # gone already (a sender that exits at once is not heard)
        return (theirs.st_dev, theirs.st_ino) == translator.namespace

    def _on_notify(self, fields: dict[str, str]) -> None:
        """Act on one accepted notify datagram (sd_notify(3)'s fields)."""
        if "MAINPID" in fields:
            self._take_main_pid(fields["MAINPID"])
        if "STATUS" in fields:
            # Shown in a terminal's table: no escape sequence gets through.
            text = "".join(c if c.isprintable() else " " for c in fields["STATUS"])
            self._status_text = text[:MAX_STATUS]
        if fields.get("STOPPING") == "1" and self._state == "running":
            self._set_state("stopping")
        if fields.get("RELOADING") == "1" and self._state == "running":
            self._reload_seen = True
            self._set_state("reloading")
        if fields.get("READY") == "1":
            self._ready_event.set()
            if self._state == "reloading":
                self._set_state("running")
                if self._reloaded is not None and self._reload_seen:
                    self._reloaded.set()

    def _take_main_pid(self, text: str) -> None:
        """Follow the process MAINPID= names, if it is one of the service's and alive."""
        translator = self._translator
        if not text.isdigit() or len(text) > 8 or translator is None or self._ended.is_set():
            return
        if translator.level and int(text) == 1:
            return  # its init, which is the caller's and follows the rest anyway
        try:
            host = translator(int(text))
        except Exception:  # no such process there: the datagram is ignored
            return
        if host == self._pid:
            return
        try:
            pidfd = _kernel.pidfd_open(host)
        except ProcessLookupError:
            return
        if not self._is_member(host):
            # The PID was reused between the lookup and the pidfd.
            os.close(pidfd)
            return
        if self._pidfd is not None:
            # Not closed here: the watcher may be waiting on it until it
            # sees the cancellation.
            self._old_pidfds.append(self._pidfd)
        self._pid, self._pidfd = host, pidfd
        self._main_is_command = False
        self._main_scope.cancel()
        self._main_scope = anyio.CancelScope()

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

    async def _open(self) -> None:
        """Bind its sockets, then start it, or with `lazy_start` and `accept` wait for a connection.

        Raises:
            OSError: a socket could not be bound (naming its address), or
                as `_launch`.
        """
        spec = self.spec
        self._listening = bind_all(spec.sockets)
        try:
            if spec.accept:
                self._serve_connections()
            elif spec.lazy_start:
                self._set_state("listening")
            else:
                await self._launch()
        except BaseException:
            close_all(spec.sockets, self._listening)
            raise

    def _serve_connections(self) -> None:
        """Ready a ConnectionServer: directories, the plan, a log, non-blocking sockets."""
        spec = self.spec
        extras = service_extras(spec)
        plan = plan_container(spec.container_spec(), list(spec.command), extras=extras)
        for sock in self._listening:
            sock.setblocking(False)  # only the caller accepts on them
        logger, write_fd = self._prepare(extras)
        self._group._run(logger.run, f"log of {spec.name}", logger.done)
        self._accept_log = write_fd
        self._server = ConnectionServer(
            spec,
            plan,
            self._listening,
            log_fd=write_fd,
            on_change=lambda: self._set_state(self._accepting()),
            recent=self._recent,
        )
        self._set_state("listening")

    def _prepare(self, extras: Extras) -> tuple[LineLogger, int]:
        """Make its directories and open its log; return the logger and its pipe's write end."""
        spec = self.spec
        for field, base in DIRECTORY_BASES.items():
            for name in getattr(spec, field):
                make_directories(base, name, extras.uid, extras.gid)
        log_fd = None
        rotation = None
        if spec.log_file is not None:
            log_fd = open_log_file(spec.log_file, extras.uid, extras.gid)
            if spec.log_max_bytes is not None:
                try:
                    rotation = Rotation(
                        spec.log_file, spec.log_max_bytes, spec.log_keep, extras.uid, extras.gid
                    )
                except BaseException:
                    os.close(log_fd)
                    raise
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        logger = self._logger = LineLogger(read_fd, log_fd, spec.name, self._recent, rotation)
        return logger, write_fd

    def _accepting(self) -> str:
        assert self._server is not None
        return "running" if self._server.active else "listening"

    @property
    def connections(self) -> int:
        """With `accept`: how many connections have a container now; else 0."""
        return 0 if self._server is None else self._server.active

    async def _run_supervisor(self) -> None:
        """Run the supervisor of its kind; `stop` waits for its end."""
        done = self._supervisor_done = anyio.Event()
        try:
            if self._server is not None:
                with self._supervisor_scope:
                    await self._server.run()
            elif self.spec.lazy_start:
                await self._supervise_lazily()
            else:
                await self._supervise()
        finally:
            done.set()

    async def _supervise_lazily(self) -> None:
        """Start the service on a connection; after its end, on the next one (lazy_start)."""
        logger = logging.getLogger(f"asynccontainer.service.{self.name}")
        with self._supervisor_scope:
            while True:
                await readable_any(self._listening)
                try:
                    await self._launch()
                except Exception as exc:
                    logger.error("starting service %r failed: %s", self.name, exc)
                    # The connection still waits: a start that keeps failing
                    # must not take a core (Shepherd's respawn limit).
                    if self._throttled():
                        self._disabled = True
                        self._finish()
                        return
                    await anyio.sleep(self.spec.respawn_delay)
                    continue
                await self._ended.wait()
                logger.info("service %r exited with status %s", self.name, self._returncode)
                self._forget_process()
                self._set_state("listening")

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
                self._set_state("restarting")
                if restarting is None:
                    logger.warning(
                        "service %r exited with status %s; respawning", self.name, self._returncode
                    )
                    # Shepherd 0.10.3's respawn delay: a crash loop costs time, not a core.
                    await anyio.sleep(self.spec.respawn_delay)
                self._forget_process()
                self._restart = None
                if restarting is None:
                    # Counted before the start, so that whoever sees it
                    # "running" again sees the count too.
                    self._restarts += 1
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
                if restarting is not None:
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


def _boot_ticks() -> int:
    """Return the time since boot in clock ticks, the unit of /proc/PID/stat's starttime."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def _check_started_since(pid: int, ticks: int, name: str) -> None:
    """Refuse a PID file's process that is older than the service's launch.

    Without a pid namespace its PID file may name any host process, which
    the service's stop would then signal: PID 1, or the caller. A daemon
    of the service started after its launch began (proc(5), starttime).

    Raises:
        PermissionError: it started before, so it is not the service's.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            started = int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return  # gone already: the watcher sees the end
    if started < ticks:
        raise PermissionError(
            f"the PID file of service {name!r} names PID {pid}, a process older than the "
            "service: not one of its own; it was not followed, and the service was stopped"
        )


async def _translator_of(container: Container) -> PidTranslator | None:
    """Return the PidTranslator of a container's pid namespace; None if it has ended.

    Read once, while its init surely lives (PidTranslator's rule). Its
    namespace's link may be refused for a moment (EACCES, seen once in a
    few hundred starts, as its init execs): tried again, for a bounded time.
    """
    for _ in range(100):
        try:
            return PidTranslator(container.pid)
        except ProcessLookupError:
            return None  # gone already: the watcher sees the end
        except PermissionError:
            await anyio.sleep(0.01)
    return PidTranslator(container.pid)


async def _stop_in_order(services: Sequence[Service]) -> None:
    """Stop services concurrently, each after those started later that require it.

    Only later ones can require an earlier one (a service starts after
    what it requires), so the waits form no cycle.
    """
    stopped = [anyio.Event() for _ in services]

    async def stop(index: int) -> None:
        service = services[index]
        try:
            for later in range(index + 1, len(services)):
                if service.name in services[later].spec.requires:
                    await stopped[later].wait()
            await service.stop()
        finally:
            stopped[index].set()

    async with anyio.create_task_group() as stoppers:
        for index in range(len(services)):
            stoppers.start_soon(stop, index)


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
        self._listeners: list[MemoryObjectSendStream[ServiceEvent]] = []
        self._entered = False
        self._closed = False

    def _run(self, function: Any, name: str, done: anyio.Event | None) -> anyio.CancelScope:
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
        return scope

    def _announce(self, event: ServiceEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener.send_nowait(event)  # unbounded: a slow reader holds no service up
            except anyio.BrokenResourceError:
                self._listeners.remove(listener)  # its reader closed it
                listener.close()

    def events(self) -> ServiceEvents:
        """Return a stream of a `ServiceEvent` for every change of state of the group's services.

        It holds the changes from this call on, in order, none lost however
        slowly it is read; iterate it (``async for event in
        group.events():``), in a task of its own if need be. The iteration
        ends once the group's block is left and its services are down.
        Closing the stream (``async with``, or ``close()``) ends it early.
        Cancellation of a reader loses nothing: the next read gets the
        next event.

        Raises:
            RuntimeError: the group is not entered, or already left.
        """
        if not self._entered or self._closed:
            raise RuntimeError("call group.events() inside 'async with ServiceGroup() as group:'")
        send, receive = anyio.create_memory_object_stream[ServiceEvent](math.inf)
        self._listeners.append(send)
        return ServiceEvents._of(receive)

    def _running_names(self) -> set[str]:
        return {service.name for service in self._services if not service._finished.is_set()}

    async def start_all(self, specs: Iterable[ServiceSpec]) -> list[Service]:
        """Start services in dependency order (their `requires`); return them in the order given.

        Those that do not depend on each other start concurrently; each
        starts once all it requires are started. All or nothing: if one
        fails, those that require it are not started, every service this
        call started is stopped (dependents first), and its error is
        raised, with a note naming the services left unstarted.

        Raises:
            ValueError: before anything starts, for two specs of one name,
                a required name that is neither among `specs` nor running
                in the group, or a cycle (the message names it).
            TypeError: for an item that is not a ServiceSpec.
            RuntimeError: the group is not entered, or already left.
            Exception: what `start` raised for the first service that
                failed (a `ServiceStartError`, a `TimeoutError` ...).

        Cancellation: what it started is stopped, shielded, first.
        """
        specs = list(specs)
        for spec in specs:
            if not isinstance(spec, ServiceSpec):
                raise TypeError(f"start_all() takes ServiceSpec items, not {spec!r}")
        if not self._entered or self._closed:
            raise RuntimeError("start services inside 'async with ServiceGroup() as group:'")
        check_order(specs, self._running_names())
        started, failed, skipped = await self._start_in_order(specs)
        if failed:
            with anyio.CancelScope(shield=True):
                await _stop_in_order(list(started.values()))
            name, error = next(iter(failed.items()))
            if skipped:
                error.add_note(
                    f"service {name!r} failed to start, so these that require it were not "
                    f"started: {', '.join(skipped)}"
                )
            raise error
        return [started[spec.name] for spec in specs]

    async def _start_in_order(
        self, specs: list[ServiceSpec]
    ) -> tuple[dict[str, Service], dict[str, Exception], dict[str, str]]:
        """Start each spec once what it requires has started; skip it if that failed.

        `check_order` has passed. Returns the services started, the errors
        of those that failed, and for each one skipped the name it required
        that did not start, all by name. `start_all` and the services file's
        runner share it.

        Cancellation: what it started is stopped, shielded, first.
        """
        started: dict[str, Service] = {}
        failed: dict[str, Exception] = {}
        skipped: dict[str, str] = {}
        settled = {spec.name: anyio.Event() for spec in specs}

        async def one(spec: ServiceSpec) -> None:
            try:
                for required in spec.requires:
                    if required in settled:
                        await settled[required].wait()
                broken = next((r for r in spec.requires if r in failed or r in skipped), None)
                if broken is not None:
                    skipped[spec.name] = broken
                    return
                try:
                    started[spec.name] = await self.start(spec)
                except Exception as exc:
                    failed[spec.name] = exc
            finally:
                settled[spec.name].set()

        try:
            async with anyio.create_task_group() as starters:
                for spec in specs:
                    starters.start_soon(one, spec)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _stop_in_order(list(started.values()))
            raise
        return started, failed, skipped

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
            await _stop_in_order(self._services)
            # Loggers end at end-of-file once every process is gone; give
            # them a moment to write the last lines, then cancel the rest.
            with anyio.move_on_after(5):
                for done in self._log_done:
                    await done.wait()
            for scope in self._helper_scopes:
                scope.cancel()
        for listener in self._listeners:
            listener.close()  # every events() iterator ends
        self._listeners.clear()
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

        Ready means: with `notify`, the service sent READY=1; with
        `pid_file`, the file names a live process (whose host PID becomes
        `service.pid`); otherwise the container is set up and the command
        exec'd. From then on, the service lasts as long as its main
        process (the PID file's, MAINPID='s, or the command's).

        Raises:
            PidFileTimeoutError: (a TimeoutError) the PID file did not name
                a live process within `start_timeout`; every process of
                the service was killed.
            TimeoutError: with `notify`, no READY=1 within `start_timeout`;
                every process of the service was killed.
            UnknownAccountError: an unknown user or group, before spawning.
            OSError: a set-up step failed (a missing `directory`, a log file
                that cannot be created, a command that does not exist ...).
            ServiceStartError: (a ContainerError) with `pid_file` or
                `notify` and a pid namespace, every process of the service
                exited before it was ready; it holds the returncode and
                the last lines of output.
            RuntimeError: the group is not entered, or already left.

        Cancellation: a service half-started is stopped first.
        """
        if not isinstance(spec, ServiceSpec):
            raise TypeError(f"start() takes a ServiceSpec, not {spec!r}")
        if not self._entered or self._closed:
            raise RuntimeError("start services inside 'async with ServiceGroup() as group:'")
        running = self._running_names()
        for required in spec.requires:
            if required not in running:
                raise ValueError(
                    f"service {spec.name!r} requires {required!r}, which is not running in the "
                    "group: start it first, or start both with group.start_all"
                )
        service = Service._of(spec, self)
        # The group's exit cancels starts in progress (and waits for them),
        # so that no container outlives it unowned.
        scope = anyio.CancelScope()
        settled = anyio.Event()
        self._starts[scope] = settled
        try:
            with scope:
                await service._open()
        except BaseException:
            service._close_notify()
            raise
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
        self._run(service._run_supervisor, f"supervisor of {spec.name}", None)
        return service
