"""run_container, call_with_container and the Container handle.

The options become a `ContainerSpec` (checked field by field) and then a
plan (checked against this machine), before anything is spawned; then one
request goes to the fork server and the rest of the set-up is awaited on
the container's handshake socket. See docs/design.md for the whole exchange.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self, TypeAlias, Unpack

import anyio
import anyio.abc

from .. import _kernel
from .._errors import ContainerError
from .._plan import encode
from .._plan.build import Target, plan_container
from .._plan.steps import (
    Bind,
    Call,
    ContainerPlan,
    Exec,
    LimitBoundingSet,
    NewRoot,
    StartInit,
    Step,
)
from .._spec.capabilities import missing_capabilities
from .._spec.container import ContainerOptions, ContainerSpec, resolve_spec
from .._spec.limits import ResourceUsage
from .._spec.network import VethNetwork
from .._wire import (
    ContainerSetup,
    Emptied,
    Execing,
    Exited,
    Forked,
    Ready,
    SetupFailed,
    SpawnFailed,
    SpawnRequest,
    StepFailed,
    decode_reply,
)
from .client import (
    AsyncFrameChannel,
    PidfdLost,
    forget_dead_server,
    kill_by_server,
    rebuild_exception,
    receive_status,
    send_request,
)
from .streams import PipeReceiveStream, PipeSendStream, _PipeEnd

__all__ = ["Container", "Target", "call_with_container", "run_container"]


class HasFileno(Protocol):
    """Anything with a `fileno()`: a file object, a socket, a `Path`'s open file."""

    def fileno(self) -> int:
        """Return the file descriptor."""
        ...


Stdio: TypeAlias = int | HasFileno | None
"""A container's stdin, stdout or stderr: None (the caller's), an fd, a `HasFileno`,
or `subprocess.PIPE`, `subprocess.DEVNULL` (or `subprocess.STDOUT` for stderr)."""
Sender: TypeAlias = PipeSendStream
Receiver: TypeAlias = PipeReceiveStream

# How long cleanup after a cancellation or an error may wait for the server
# to report the exit of a SIGKILLed container. Reaping takes milliseconds;
# past this the server itself is wedged, and waiting longer helps nobody.
_REAP_TIMEOUT = 30.0


class Container:
    """A running (or finished) container, as returned by `run_container`.

    Like `subprocess.Popen`, it does not stop the container when it is
    garbage-collected: use `async with`, `stop`, or `wait`. Signals go
    through a pidfd, so they never reach a process that merely reuses the
    container's PID after it was reaped.
    """

    stdin: anyio.abc.ByteSendStream | None
    """Its stdin as a byte stream, with ``stdin=subprocess.PIPE``; else None."""
    stdout: anyio.abc.ByteReceiveStream | None
    """Its stdout as a byte stream, with ``stdout=subprocess.PIPE``; else None."""
    stderr: anyio.abc.ByteReceiveStream | None
    """Its stderr as a byte stream, with ``stderr=subprocess.PIPE``; else None."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "a Container is not constructed directly: run_container or open_process returns one"
        )

    @classmethod
    def _started(cls, pid: int, pidfd: int, status: AsyncFrameChannel) -> Container:
        container = cls.__new__(cls)
        container._setup(pid, pidfd, status)
        return container

    def _setup(self, pid: int, pidfd: int, status: AsyncFrameChannel) -> None:
        self._pid = pid
        self._pidfd: int | None = pidfd
        self._status: AsyncFrameChannel | None = status
        self._returncode: int | None = None
        self._wait_lock = anyio.Lock()
        self._usage: ResourceUsage | None = None
        self._network: VethNetwork | None = None
        # Its first process has exited, and processes it forked still run
        # in its cgroup (no pid namespace): the status socket stays open
        # for `_end_remains`.
        self._lingering = False
        # The read end of its init's status pipe (see `_through_init`), if it
        # has one, and whether that init stays while any process is left.
        self._init_status: int | None = None
        self._init_stays = False
        # The caller's ends of its piped stdio (subprocess.PIPE), if any.
        self.stdin = None
        self.stdout = None
        self.stderr = None

    @property
    def pid(self) -> int:
        """The host PID of the container's first process (PID 1 inside, with "pid")."""
        return self._pid

    @property
    def returncode(self) -> int | None:
        """None while running; then the exit code, or -N if signal N killed it."""
        return self._returncode

    @property
    def network(self) -> VethNetwork | None:
        """The veth pair's names and addresses with `network="veth"`; else None."""
        return self._network

    @property
    def usage(self) -> ResourceUsage | None:
        """What the container used (CPU time, memory peak, OOM kills), once it has exited.

        None while it runs, and for a container started without `limits=`
        (pass `limits={}` to account without limiting).
        """
        return self._usage

    def __repr__(self) -> str:
        state = "running" if self._returncode is None else f"returncode={self._returncode}"
        return f"<Container pid={self._pid} {state}>"

    async def wait(self) -> int:
        """Wait for the container to exit and return its returncode.

        The container has exited when its first process has. Without a pid
        namespace, what it forked and left running lives on in its cgroup
        until the container is closed: on leaving `async with`, by `stop`
        or `kill`, or when it is garbage-collected.

        Cancelling `wait` leaves the container running; it may be called
        again, from any number of tasks.

        Raises:
            ContainerError: if the fork server died, which kills the container
                too; `returncode` is then -SIGKILL.
        """
        async with self._wait_lock:
            while self._returncode is None:
                assert self._status is not None
                try:
                    message, _ = await receive_status(self._status)
                except ContainerError:
                    self._finish(-signal.SIGKILL)
                    forget_dead_server()
                    raise
                if isinstance(message, Exited):
                    self._usage = message.usage
                    self._lingering = message.lingering
                    self._finish(self._through_init(message.returncode))
        return self._returncode

    def _through_init(self, returncode: int) -> int:
        """Return -N for an init's 128+N that its status pipe says was signal N.

        An init (PID 1) cannot die of the signal its target died of; it
        exits 128+N and writes N on the pipe. Only a byte that agrees with
        the status is taken: what a process of the container could write
        there says nothing the status does not.
        """
        fd, self._init_status = self._init_status, None
        if fd is None:
            return returncode
        try:
            data = os.read(fd, 4 if self._init_stays else 1)
        except BlockingIOError:
            data = b""
        finally:
            os.close(fd)
        if self._init_stays:
            return _command_status(data, returncode)
        if data and 0 < data[0] < 128 and returncode == 128 + data[0]:
            return -data[0]
        return returncode

    def _target_dup(self) -> int | None:
        """Return a new fd of the init's status pipe, which turns readable when the target ends.

        Only for an init that stays (a service's): it writes there as soon
        as it reaps the target. A copy, as the pipe's own fd is closed when
        the container ends, maybe while a task still waits on the copy.
        """
        if not self._init_stays or self._init_status is None:
            return None
        return os.dup(self._init_status)

    def _finish(self, returncode: int) -> None:
        self._returncode = returncode
        if self._lingering and self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        else:
            self._close()

    def _request_kill(self) -> None:
        """Have the server kill everything in the container's cgroup (a byte on the status socket).

        The socket's caller-to-server direction carries nothing else: the
        byte never waits for room. Without a tracking cgroup the server
        kills the first process alone, which the pidfd did already.
        """
        if self._status is None:
            return
        try:
            self._status.sock.send(b"k")
        except OSError:
            pass  # the server is gone, and its containers with it

    async def _end_remains(self) -> None:
        """Kill what the container left in its cgroup, and wait until it is gone (bounded)."""
        if not self._lingering:
            return  # the common case, taken with no checkpoint: nothing was left
        async with self._wait_lock:
            if not self._lingering or self._status is None:
                return
            self._request_kill()
            with anyio.move_on_after(_REAP_TIMEOUT):
                while True:
                    try:
                        message, _ = await receive_status(self._status)
                    except ContainerError:
                        # The server died: what is left of its cgroups is
                        # ended now if it can be told dead, else at the next
                        # start of a server (sweep_stale).
                        forget_dead_server()
                        break
                    if isinstance(message, Emptied):
                        break
            self._lingering = False
            self._close()

    def _close(self) -> None:
        if self._init_status is not None:
            os.close(self._init_status)
            self._init_status = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._status is not None:
            self._status.close()
            self._status = None

    def send_signal(self, sig: int) -> None:
        """Send signal `sig` to the container's first process; a no-op once it has exited.

        With a pid namespace, that process is PID 1 of the namespace, which
        only receives signals it has a handler for, SIGKILL and SIGSTOP
        excepted (pid_namespaces(7)): a plain `sleep` ignores SIGTERM there.
        """
        if self._returncode is not None or self._pidfd is None:
            return
        try:
            _kernel.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            # Exited, not reaped yet: nothing left to signal.
            pass

    def terminate(self) -> None:
        """Send SIGTERM (see `send_signal`)."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the container: its first process, and every process in its cgroup.

        Without a pid namespace the processes it forked are not ended with
        its first process, but they are in the cgroup the fork server made
        for it (when it may make cgroups: see docs/security.md), and die
        too, also after the first process has exited.
        """
        self.send_signal(signal.SIGKILL)
        self._request_kill()

    async def stop(self, grace: float = 5.0) -> int:
        """Send SIGTERM, then SIGKILL if it still runs after `grace` seconds; return the returncode.

        Once the first process has exited, what it forked and left running
        (without a pid namespace) is killed, and `stop` returns when it is
        gone too.

        If `stop` is cancelled, the container is killed and reaped before
        the cancellation propagates.

        Raises:
            ValueError: if `grace` is negative or not a number.
        """
        _check_duration("grace", grace)
        try:
            if self._returncode is None:
                self.terminate()
                with anyio.move_on_after(grace):
                    await self.wait()
            if self._returncode is None:
                self.kill()
                await self.wait()
        except BaseException:
            await self._kill_and_reap()
            raise
        if self._lingering:
            with anyio.CancelScope(shield=True):
                await self._end_remains()
        assert self._returncode is not None
        return self._returncode

    async def _kill_and_reap(self) -> None:
        """Kill, wait, end what it left: shielded from cancellation, bounded by _REAP_TIMEOUT."""
        if self._returncode is not None and not self._lingering:
            return  # ended, and nothing left: no checkpoint (call_with_container's hot path)
        with anyio.CancelScope(shield=True):
            if self._returncode is None:
                with anyio.move_on_after(_REAP_TIMEOUT):
                    self.kill()
                    try:
                        await self.wait()
                    except ContainerError:
                        pass
            await self._end_remains()

    async def aclose(self) -> None:
        """Close its piped stdio, then kill and reap the container if it still runs.

        As leaving `async with` does; `anyio.abc.Process.aclose`'s counterpart.
        Once it returns, nothing of the container runs.

        Cancellation: the kill and the reap are shielded (bounded by 30 s)
        and happen anyway.
        """
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
        await self._kill_and_reap()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close its piped stdio; kill and reap it if it still runs, also on cancellation."""
        await self.aclose()

    def __del__(self) -> None:
        if not hasattr(self, "_pid"):
            return  # its constructor refused: nothing was set up
        if self._returncode is None and self._pidfd is not None:
            warnings.warn(
                f"{self!r} was garbage-collected while running; use 'async with' or "
                "await stop() or wait()",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )
        self._close()
        for stream in (self.stdin, self.stdout, self.stderr):
            if isinstance(stream, _PipeEnd):
                stream.close_now()


def _check_duration(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be zero or more seconds, not {value!r}")


# Python sets sys.__stdin__ (and the others) to None when the process was
# started without that fd.
_STANDARD_STREAMS = ("__stdin__", "__stdout__", "__stderr__")


class _StdioFds:
    """The three fds a container starts with, and the ones opened only to pass them."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.opened: list[int] = []
        # subprocess.PIPE: the caller's ends, by stdio number, until taken.
        self.parents: dict[int, int] = {}

    def add(self, name: str, number: int, value: Stdio) -> None:
        if value == subprocess.PIPE and not isinstance(value, bool):
            read, write = os.pipe2(os.O_CLOEXEC)
            child, parent = (read, write) if number == 0 else (write, read)
            self.opened.append(child)
            self.parents[number] = parent
            self.fds.append(child)
            return
        if value == subprocess.STDOUT and not isinstance(value, bool) and number == 2:
            self.fds.append(self.fds[1])
            return
        if value is None and getattr(sys, _STANDARD_STREAMS[number]) is None:
            # The caller was started without this fd: whatever holds the
            # number now (its event loop's epoll fd, say) is not its stdio.
            value = subprocess.DEVNULL
        if value is None:
            fd = number
        elif value == subprocess.DEVNULL:
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self.opened.append(fd)
        elif isinstance(value, bool):
            raise TypeError(f"{name} must be None, an fd or a file object, not {value!r}")
        elif isinstance(value, int):
            if value < 0:
                raise ValueError(
                    f"{name}={value} is not supported; pass None, an fd, a file object, "
                    "subprocess.PIPE or subprocess.DEVNULL"
                    + (
                        " (subprocess.STDOUT is for stderr only)"
                        if value == subprocess.STDOUT
                        else ""
                    )
                )
            fd = value
        elif hasattr(value, "fileno"):
            fd = value.fileno()
        else:
            raise TypeError(f"{name} must be None, an fd or a file object, not {value!r}")
        try:
            os.fstat(fd)
        except OSError:
            if value is not None:
                raise ValueError(f"{name}={value!r} is not an open file descriptor") from None
            # The caller runs without this stdio fd: give the container /dev/null.
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self.opened.append(fd)
        self.fds.append(fd)

    def take_streams(
        self,
    ) -> tuple[PipeSendStream | None, PipeReceiveStream | None, PipeReceiveStream | None]:
        """Return the caller's ends of the pipes as streams (stdin, stdout, stderr); theirs now."""
        parents, self.parents = self.parents, {}
        stdin = PipeSendStream(parents[0]) if 0 in parents else None
        stdout = PipeReceiveStream(parents[1]) if 1 in parents else None
        stderr = PipeReceiveStream(parents[2]) if 2 in parents else None
        return stdin, stdout, stderr

    def close(self) -> None:
        """Close what was opened only to be passed, and the pipes' ends not taken."""
        for fd in [*self.opened, *self.parents.values()]:
            os.close(fd)
        self.opened.clear()
        self.parents.clear()


async def run_container(
    target: Target,
    spec: ContainerSpec | None = None,
    *,
    stdin: Stdio = None,
    stdout: Stdio = None,
    stderr: Stdio = None,
    **options: Unpack[ContainerOptions],
) -> Container:
    """Start `target` in a new container and return it once it is ready.

    Ready means: its namespaces exist, its id maps are written, its file
    systems are mounted, the root is pivoted (and read-only unless
    `writable_root`), and the target is about to run (for a command: the
    exec succeeded).

    Args:
        target: a command (sequence of str, looked up on the container's PATH
            as execvp does) or a callable taking no arguments (a lambda or a
            closure will do: it is sent with cloudpickle). A callable that
            returns exits 0; one that raises prints its traceback to the
            container's stderr and exits 1.
        spec: a `ContainerSpec` holding the options; None for the defaults.
        stdin: None to share the caller's, an fd, a file object, or
            subprocess.DEVNULL.
        stdout: as stdin.
        stderr: as stdin.
        **options: any field of `ContainerSpec` (root, mounts, namespaces,
            hostname, env, limits ...), overriding the field of `spec`.

    Returns:
        The running `Container`.

    Raises:
        TypeError, ValueError: for bad arguments, before anything is spawned.
        OSError: a set-up step that failed inside the container, re-raised
            here with its class, errno and file name (a bind mount whose
            source is missing raises FileNotFoundError), and the container's
            traceback as a note; FileNotFoundError or PermissionError when
            the command cannot be executed, as subprocess raises them.
        ContainerError: when the fork server fails or dies.
        PermissionError, OSError: for `limits=`, before anything is spawned,
            when this process may not create cgroups (not root, no
            delegated cgroup) or no hierarchy offers a controller (ENOTSUP).

    Cancellation: if cancelled, the container (if it was created) is killed
    and reaped before the cancellation propagates.
    """
    resolved = resolve_spec(spec, options)
    stdio = _StdioFds()
    try:
        stdio.add("stdin", 0, stdin)
        stdio.add("stdout", 1, stdout)
        stdio.add("stderr", 2, stderr)
        console = os.ttyname(stdio.fds[0]) if os.isatty(stdio.fds[0]) else None
        plan, request = plan_container(resolved, target, console=console)
        container, root = await spawn(plan, request, [*stdio.fds, *resolved.pass_fds])
        container.stdin, container.stdout, container.stderr = stdio.take_streams()
    finally:
        stdio.close()
    if root is not None:
        os.close(root)  # not asked for: the plan has no send_root
    return container


async def spawn(
    plan: ContainerPlan, request: SpawnRequest, fds: list[int]
) -> tuple[Container, int | None]:
    """Start a container that runs `plan`; return it once ready, with the root's fd if sent.

    The root's fd (O_PATH, the caller's to close) comes when the plan's
    last step has `send_root`: files inside stay reachable through it
    after the container's first process exits.

    Raises:
        What the plan's failing step raised, rebuilt (see `await_ready`).

    Cancellation: the container is killed and reaped first.
    """
    setup: object = ContainerSetup(plan)
    if encode.chosen_executor() == "c":
        encoded = encode.encode(plan)
        if encoded is not None:
            setup = encoded
            request = request._replace(executor="c")
    init = next((s for s in plan.steps if isinstance(s, StartInit) and s.status_fd >= 0), None)
    status_read = -1
    if init is not None:
        # The init's status pipe: passed after the user's fds (the plan
        # places it at init.status_fd); the read end is the container's.
        status_read, status_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        fds = [*fds, status_write]
    try:
        container, handshake = await start_process(request, setup, fds)
    except BaseException:
        if status_read >= 0:
            os.close(status_read)
        raise
    finally:
        if status_read >= 0:
            os.close(fds[-1])
    container._init_status = status_read if status_read >= 0 else None
    container._init_stays = init is not None and not init.follow_child
    try:
        root = await await_ready(container, handshake, plan)
    except BaseException:
        await container._kill_and_reap()
        raise
    finally:
        handshake.close()
    return container, root


async def start_process(
    request: SpawnRequest, setup: object, fds: Sequence[int]
) -> tuple[Container, AsyncFrameChannel]:
    """Have the fork server clone a process, send it `setup`, and return it with its handshake.

    The process is set up and running its target once `await_ready`
    returns; the caller owns the returned channel and must close it.

    Raises:
        OSError, ContainerError: as the server reports a failed clone.

    Cancellation: whatever was created is killed and reaped first.
    """
    caller_handshake, child_handshake = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        caller_status, server_status = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except BaseException:  # EMFILE: nothing may be left open
        caller_handshake.close()
        child_handshake.close()
        raise
    # What comes back on it is written by a process in the container's hands.
    handshake = AsyncFrameChannel(caller_handshake, decode_reply)
    status = AsyncFrameChannel(caller_status)
    requested = False
    try:
        try:
            await send_request(request, [child_handshake.fileno(), server_status.fileno()])
            requested = True
        finally:
            child_handshake.close()
            server_status.close()
        try:
            if isinstance(setup, bytes):
                await handshake.send_bytes(setup, fds)  # a plan for the C executor
            else:
                await handshake.send(setup, fds)
        except (BrokenPipeError, ConnectionResetError):
            # The child died before reading it; the status channel says why.
            pass
        try:
            message, pidfd = await receive_status(status)
        except PidfdLost as lost:
            # Without its pidfd the container would have no handle: the
            # server, its parent, kills it; its exit is read as usual below.
            await kill_by_server(lost.pid)
            raise OSError(
                errno.EMFILE,
                "this process had no free file descriptor for the container's pidfd; the "
                "container was killed. Raise the soft limit (RLIMIT_NOFILE, `ulimit -n`) or "
                "close fds",
            ) from None
        if isinstance(message, SpawnFailed):
            await _drain(status)
            raise clone_hint(rebuild_exception(message.error))
        if not isinstance(message, Forked) or pidfd is None:
            raise ContainerError(f"unexpected message from the fork server: {message!r}")
    except BaseException:
        # Cancelled or failed: nothing may outlive this call.
        handshake.close()
        if requested:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_REAP_TIMEOUT):
                await _drain(status, kill=True)
        status.close()
        raise
    container = Container._started(message.pid, pidfd, status)
    container._network = message.network
    return container, handshake


async def next_reply(handshake: AsyncFrameChannel, keep: list[int] | None = None) -> object | None:
    """Return the next message on a handshake channel, or None at its end-of-file.

    fds that came with it are appended to `keep`, or closed.
    """
    try:
        reply, fds = await handshake.receive()
    except EOFError:
        return None
    if keep is not None:
        keep.extend(fds)
    else:
        for fd in fds:
            os.close(fd)
    return reply


async def await_ready(
    container: Container, handshake: AsyncFrameChannel, plan: ContainerPlan | None = None
) -> int | None:
    """Wait until the process reports that its target runs; return the root's fd if it sent one.

    Raises:
        The exception its set-up or exec raised (after reaping it), or
        ContainerError if it died without a word.

    Cancellation: a root's fd received already is closed.
    """
    execing = False
    root: int | None = None
    try:
        while True:
            received: list[int] = []
            reply = await next_reply(handshake, received)
            for fd in received:
                # The container's root, sent with its ready reply (send_root).
                if root is None and isinstance(reply, Ready | Execing):
                    root = fd
                else:
                    os.close(fd)
            if reply is None:
                if execing:
                    return root
                returncode = await container.wait()
                raise ContainerError(
                    f"the container process exited during its set-up with status {returncode} "
                    "before reporting an error (killed from outside?)"
                )
            if isinstance(reply, Ready | Execing) and root is None and _sends_root(plan):
                await container._kill_and_reap()
                raise OSError(
                    errno.EMFILE,
                    "this process had no free file descriptor for the container's root; the "
                    "container was killed. Raise the soft limit (RLIMIT_NOFILE) or close fds",
                )
            if isinstance(reply, Ready):
                return root
            if isinstance(reply, Execing):
                execing = True
            elif isinstance(reply, StepFailed | SetupFailed):
                await container.wait()
                raise rebuild_failure(reply, plan)
            else:
                raise ContainerError(f"unexpected message from the container: {reply!r}")
    except BaseException:
        # Failed, or cancelled while the exec's end-of-file was awaited: the
        # root's fd is nobody's.
        if root is not None:
            os.close(root)
        raise


def _command_status(data: bytes, returncode: int) -> int:
    """Return the returncode of the command of an init that stays, from its wait status.

    The init exits with the command's status (128+N for signal N). It may
    also have been SIGKILLed, after the command, to end what was left
    (the stop of a service past its grace period): the command's status
    holds then too. A process of the container can write to the pipe; it
    can make the status look like any other status of its own choosing,
    which it could have exited with.
    """
    if len(data) != 4:
        return returncode
    status = int.from_bytes(data, sys.byteorder, signed=True)
    try:
        code = os.waitstatus_to_exitcode(status)
    except ValueError:
        return returncode  # not an exit status at all
    if returncode in (128 - code if code < 0 else code, -signal.SIGKILL):
        return code
    return returncode


def _sends_root(plan: ContainerPlan | None) -> bool:
    last = plan.steps[-1] if plan is not None and plan.steps else None
    return isinstance(last, Exec | Call) and last.send_root


def _maps_nothing(steps: Sequence[Step]) -> bool:
    """Return True for a plan whose root is a fresh tmpfs with no host tree mapped (/dev aside)."""
    fresh = any(isinstance(step, NewRoot) and step.slot is None for step in steps)
    return fresh and not any(
        isinstance(step, Bind) and not step.target.startswith("/dev/") for step in steps
    )


def clone_hint(exc: BaseException) -> BaseException:
    """Add what to do to a failed clone of the fork server's (ENOSPC, EPERM), and return it."""
    if not isinstance(exc, OSError):
        return exc
    if exc.errno == errno.ENOSPC:
        exc.add_note(
            "The kernel refused a new namespace or process: a limit is reached, such as "
            "user.max_user_namespaces (sysctl) or the pid namespace's max. "
            "`asynccontainer check` shows what this kernel allows."
        )
    elif exc.errno == errno.EPERM:
        exc.add_note(
            "The kernel refused to make the namespaces: unprivileged user namespaces may be "
            "off (kernel.unprivileged_userns_clone, or AppArmor's "
            "kernel.apparmor_restrict_unprivileged_userns), or a seccomp filter forbids "
            "clone3. `asynccontainer check` says which."
        )
    return exc


def rebuild_failure(failure: StepFailed | SetupFailed, plan: ContainerPlan | None) -> BaseException:
    """Return the exception a container reported, naming the step and the user's own path.

    An OSError is rebuilt here from its errno, with the path the step is
    about as the user gave it; any other exception is unpickled.
    """
    if isinstance(failure, SetupFailed):
        return rebuild_exception(failure.error)
    steps = plan.steps if plan is not None else ()
    step = steps[failure.step] if 0 <= failure.step < len(steps) else None
    where = (
        "" if step is None else f" at step {failure.step + 1} of {len(steps)}, {step.describe()}"
    )
    exc: BaseException
    if failure.errno is not None:
        filename = step.path if step is not None and step.path is not None else failure.filename
        strerror = failure.strerror or os.strerror(failure.errno)
        if isinstance(step, LimitBoundingSet) and failure.detail:
            strerror = missing_capabilities(failure.detail)
        exc = (
            OSError(failure.errno, strerror, filename)
            if filename
            else OSError(failure.errno, strerror)
        )
        exc.add_note(f"Raised in the container process{where}:\n{failure.traceback.rstrip()}")
        if isinstance(step, Exec) and failure.errno == errno.ENOENT and _maps_nothing(steps):
            exc.add_note(
                "The container's root is a fresh tmpfs with nothing mapped into it, so it "
                "has no programs: pass mounts=ac.HOST_SYSTEM_MAPPINGS to map the host's "
                "(/usr, /bin, /lib ... read-only), or root= a tree that has them."
            )
        return exc
    assert failure.error is not None
    return rebuild_exception(failure.error, where)


async def _drain(status: AsyncFrameChannel, *, kill: bool = False) -> None:
    """Read a status channel to its end: until the container's exit, or the server's EOF."""
    while True:
        try:
            message, pidfd = await receive_status(status)
        except ContainerError:
            return
        if pidfd is not None:
            if kill:
                try:
                    _kernel.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.close(pidfd)
        if isinstance(message, Exited):
            return


async def call_with_container(
    target: Target,
    spec: ContainerSpec | None = None,
    *,
    stdin: Stdio = None,
    stdout: Stdio = None,
    stderr: Stdio = None,
    **options: Unpack[ContainerOptions],
) -> int:
    """Run `target` in a new container, wait for it, and return its returncode.

    Takes what `run_container` takes. This is Guix's call-with-container,
    with a fresh tmpfs root instead of a temporary directory of the host.

    It raises what `run_container` raises.

    Cancellation: if cancelled (for example by `anyio.fail_after`), the
    container is killed and reaped before the cancellation propagates.
    """
    container = await run_container(
        target, spec, stdin=stdin, stdout=stdout, stderr=stderr, **options
    )
    async with container:
        return await container.wait()
