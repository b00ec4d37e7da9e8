"""The caller's side of the fork server: start it, send requests, read replies.

Everything here is async through anyio and works under asyncio and trio, and
under several event loops of one process at once: the only shared state is
the server process and its control socket, and sending a datagram on that
socket needs no lock (see `_protocol`).
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

import anyio

from .._errors import ContainerError
from .._kernel.cgroups import PREFIX, TrackedCgroup, hierarchies
from .._wire import (
    Emptied,
    ExceptionInfo,
    Exited,
    Forked,
    FrameBuffer,
    KillRequest,
    SpawnFailed,
    SpawnRequest,
    encode_frame,
    fds_ancillary,
    recvmsg_fds,
)

__all__ = [
    "AsyncFrameChannel",
    "ForkServer",
    "PidfdLost",
    "fork_server",
    "kill_by_server",
    "rebuild_exception",
    "receive_status",
    "send_request",
    "shutdown_fork_server",
]

# Runs in the fresh interpreter: `-I` keeps the caller's PYTHON* variables
# and user site out of the server, and the caller's sys.path comes in argv.
_BOOTSTRAP = (
    "import sys; sys.path[:] = __import__('json').loads(sys.argv[1]); "
    "from asynccontainer._forkserver.server import main; main(sys.argv[2:])"
)


class ForkServer:
    """One running fork server process and the caller's end of its control socket."""

    def __init__(self) -> None:
        caller_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # PR_SET_PDEATHSIG fires when the *thread* that forked the server
        # exits (prctl(2)); only the main thread lives as long as the process.
        die_with_parent = threading.current_thread() is threading.main_thread()
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    # No site: sys.path comes in argv, and site's .pth files
                    # (an editable install's among them) cost the start time.
                    "-S",
                    "-c",
                    _BOOTSTRAP,
                    json.dumps(sys.path),
                    str(server_end.fileno()),
                    str(os.getpid()),
                    "1" if die_with_parent else "0",
                ],
                pass_fds=[server_end.fileno()],
                # Nothing on stdout; a traceback of the server's on the
                # caller's stderr, if it has one: a caller started without
                # fd 2 may hold something else there now (its event loop's
                # epoll fd, say), and so may fd 1.
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None if sys.__stderr__ is not None else subprocess.DEVNULL,
                close_fds=True,
                env=_server_environment(),
            )
        except BaseException:
            caller_end.close()
            raise
        finally:
            server_end.close()
        caller_end.setblocking(False)
        caller_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CONTROL_BUFFER)
        self.control = caller_end

    @property
    def pid(self) -> int:
        """The server's PID."""
        return self.process.pid

    def alive(self) -> bool:
        """Return True while the server process runs (reaping it once it has exited)."""
        return self.process.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        """Close the control socket and wait for the server to exit.

        The server kills and reaps its remaining containers on end-of-file.
        """
        self.control.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_server_lock = threading.Lock()
_server: ForkServer | None = None


def fork_server() -> ForkServer:
    """Return this process's fork server, starting it on first use or after it died."""
    global _server
    with _server_lock:
        if _server is not None and _server.alive():
            return _server
        if _server is not None:
            _server.control.close()
            _end_what_it_left(_server)
        _server = ForkServer()
        return _server


def forget_dead_server() -> None:
    """If the fork server has died, end what it left now, not at the next start."""
    global _server
    with _server_lock:
        if _server is not None and not _server.alive():
            _server.control.close()
            _end_what_it_left(_server)
            _server = None


def _end_what_it_left(server: ForkServer) -> None:
    """Kill what still runs in the cgroups of a fork server that was killed, and remove them.

    Its containers died with it (PR_SET_PDEATHSIG), but not what those
    without a pid namespace forked: that is still in their cgroups. The
    server was reaped (`alive` returned False), so its PID, which names its
    cgroups, is not anyone else's yet.
    """
    if server.process.returncode == 0:
        return  # it shut down cleanly, ending everything itself
    try:
        mounted = hierarchies()
    except OSError:
        return
    for hierarchy in mounted:
        base = os.path.join(hierarchy.own, f"{PREFIX}{server.pid}")
        if os.path.isdir(base):
            TrackedCgroup(base, hierarchy.version).end()


def shutdown_fork_server() -> None:
    """Stop this process's fork server, if one runs; the next container starts a new one.

    Containers still running are killed by the server before it exits.
    """
    global _server
    with _server_lock:
        server, _server = _server, None
    if server is not None:
        server.close()
        _end_what_it_left(server)


def _at_fork_in_child() -> None:
    # A forked child must not share the parent's server: the parent's Popen
    # object cannot be waited on from here, and the child's containers would
    # outlive it. It starts a server of its own on first use.
    global _server, _server_lock
    _server_lock = threading.Lock()
    if _server is not None:
        _server.control.close()
        _server = None


os.register_at_fork(after_in_child=_at_fork_in_child)


def _server_environment() -> dict[str, str]:
    """Return the fork server's environment: nothing of the caller's but the loader's path.

    A callable target is a fork of the server, never exec'd: the server's
    initial environment is what its /proc/self/environ shows, whatever
    `env=` says. The interpreter may need LD_LIBRARY_PATH to start at all.
    """
    return {key: os.environ[key] for key in ("LD_LIBRARY_PATH",) if key in os.environ}


def _shut_down_at_exit() -> None:
    # At exit, end-of-file on the control socket makes the server kill the
    # containers left and exit; waiting for it reaps it, and closing the
    # socket here spares the interpreter's "unclosed socket" warning.
    try:
        shutdown_fork_server()
    except Exception:
        pass


atexit.register(_shut_down_at_exit)


# Retry pauses while the control socket's buffer is full.
_FULL_PAUSE_FIRST = 0.0005
_FULL_PAUSE_LAST = 0.02
# Room for many queued requests before senders have to pause: a burst of a
# few hundred starts is the normal case (the kernel caps it at wmem_max).
_CONTROL_BUFFER = 4 * 1024 * 1024


async def send_request(request: SpawnRequest | KillRequest, fds: Sequence[int]) -> None:
    """Send one request datagram to the fork server (starting it if needed).

    Raises:
        ContainerError: when the server cannot be reached even after a restart.
    """
    # One datagram, one request: no frame header needed.
    data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
    for attempt in range(2):
        server = fork_server()
        try:
            pause = _FULL_PAUSE_FIRST
            while True:
                try:
                    server.control.sendmsg([data], fds_ancillary(fds))
                    return
                except BlockingIOError:
                    # The server is behind. Every task, of every event loop
                    # and thread, may be here at once: waiting for the fd to
                    # turn writable would take one waiter only (trio raises
                    # BusyResourceError for a second), so each retries after
                    # a pause of its own instead.
                    await anyio.sleep(pause)
                    pause = min(pause * 2, _FULL_PAUSE_LAST)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The server died (killed from outside?): the request was not
            # delivered, so it is safe to start another server and resend.
            if attempt:
                raise ContainerError(
                    f"the fork server (PID {server.pid}) is not reachable: {exc}; "
                    "check that nothing kills it and that sys.executable runs"
                ) from exc


class AsyncFrameChannel:
    """Frames over one non-blocking stream socket, read and written asynchronously."""

    def __init__(
        self, sock: socket.socket, loads: Callable[[bytes], object] = pickle.loads
    ) -> None:
        """Read frames of `sock` with `loads`: `decode_reply` for what comes from inside."""
        sock.setblocking(False)
        self.sock = sock
        self._buffer = FrameBuffer(loads)
        self._eof = False

    async def receive(self) -> tuple[object, list[int]]:
        """Return the next (message, fds).

        Raises:
            EOFError: when the peer closed its end before a whole frame came.
        """
        while True:
            frame = self._buffer.next_frame()
            if frame is not None:
                return frame
            if self._eof:
                raise EOFError("the peer closed the socket")
            try:
                data, fds, lost = recvmsg_fds(self.sock, 65536)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            except ConnectionResetError:
                data, fds, lost = b"", [], False
            if not data and not fds:
                self._eof = True
            self._buffer.feed(data, fds, lost)

    async def send(self, message: object, fds: Sequence[int] = ()) -> None:
        """Send one frame, its fds with the first byte.

        Raises:
            BrokenPipeError: when the peer is gone.
        """
        await self.send_bytes(encode_frame(message, len(fds)), fds)

    async def send_bytes(self, payload: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are (a C executor's plan), `fds` with the first byte.

        Raises:
            BrokenPipeError: when the peer is gone.
        """
        data = memoryview(payload)
        ancillary = fds_ancillary(fds)
        while data:
            try:
                sent = self.sock.sendmsg([data], ancillary)
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
                continue
            data = data[sent:]
            ancillary = []

    def close(self) -> None:
        """Close the socket and any fds received but not handed out."""
        self._buffer.close()
        self.sock.close()


async def receive_status(
    status: AsyncFrameChannel,
) -> tuple[Forked | SpawnFailed | Exited | Emptied, int | None]:
    """Return the next message of a status channel, and the pidfd a `Forked` brings.

    Raises:
        ContainerError: when the server closed the channel without a word,
            which means it died.
    """
    try:
        message, fds = await status.receive()
    except EOFError:
        raise ContainerError(
            "the fork server exited while a container was running; the container was "
            "killed with it. Look for a traceback of the server on stderr, or an OOM kill"
        ) from None
    if isinstance(message, Forked) and len(fds) == 1:
        return message, fds[0]
    if isinstance(message, Forked) and not fds:
        raise PidfdLost(message.pid)
    for fd in fds:
        os.close(fd)
    if isinstance(message, SpawnFailed | Exited | Emptied):
        return message, None
    raise ContainerError(f"unexpected message from the fork server: {message!r}")


class PidfdLost(Exception):
    """The pidfd of a container came without its fd: this process had none free (EMFILE)."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.pid = pid


async def kill_by_server(pid: int) -> None:
    """Have the fork server SIGKILL its container `pid` (one whose pidfd is lost)."""
    await send_request(KillRequest(pid), ())


def rebuild_exception(info: ExceptionInfo, where: str = "") -> BaseException:
    """Return the remote exception, rebuilt from data (see `ExceptionInfo.rebuild`).

    `where` (" at step 3 of 20, ...") goes into the note beside its traceback.
    """
    return info.rebuild(where)
