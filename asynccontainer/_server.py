"""The fork server: a small, single-threaded process that clones every container.

It is exec'd fresh by the caller (see `_client`), never forked from it: the
caller may be multi-threaded (fork would copy locks held by other threads,
and unshare(CLONE_NEWUSER) refuses multi-threaded callers with EINVAL) and
large (fork time grows with the caller's page tables). It imports nothing but
the standard library, attrs and this package's synchronous modules.

Its loop does little and never waits on a container: for each request it
clones the child, writes its id maps, sends the caller the child's PID and a
pidfd, and lets the child go. The set-up itself is awaited by the caller,
over the handshake socket the child inherited. When a child exits, the
server reaps it and sends its returncode on the container's status socket.

It exits when the control socket reaches end-of-file (every copy of the
caller's end is closed, for example because the caller exited) after killing
and reaping the containers still running, and it dies with its parent
through PR_SET_PDEATHSIG, and its containers die with it the same way.
"""

from __future__ import annotations

import os
import pickle
import resource
import selectors
import signal
import socket
import sys
from typing import NoReturn

# Imported here, once, so that no container pays for it: the child uses it
# to send back exceptions, and to unpickle callables.
import cloudpickle  # noqa: F401

from . import _kernel
from ._child import container_main
from ._namespaces import write_id_maps
from ._protocol import (
    ExceptionInfo,
    Exited,
    Forked,
    SpawnFailed,
    SpawnRequest,
    encode_frame,
    fds_ancillary,
    recvmsg_fds,
)

__all__ = ["main", "serve"]

# A request is a pickled SpawnRequest of a few hundred bytes.
_MAX_REQUEST = 65536


class _Server:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.selector = selectors.DefaultSelector()
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The container's status socket, by PID, until it is reaped.
        self.status: dict[int, socket.socket] = {}
        self.running = True

    def run(self) -> None:
        # SIGCHLD wakes the loop through the wakeup fd (PEP 475 retries the
        # interrupted call); reaping happens in the loop, not in a handler.
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.selector.register(self.control, selectors.EVENT_READ)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ)
        while self.running:
            for key, _ in self.selector.select():
                if key.fileobj is self.control:
                    self.receive_request()
                else:
                    while True:
                        try:
                            if not os.read(self.wakeup_r, 4096):
                                break
                        except BlockingIOError:
                            break
            self.reap()
        self.shut_down()

    def receive_request(self) -> None:
        try:
            data, fds = recvmsg_fds(self.control, _MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            # Every copy of the caller's end is closed.
            for fd in fds:
                os.close(fd)
            self.running = False
            return
        try:
            request = pickle.loads(data)
            if not isinstance(request, SpawnRequest) or len(fds) != 2:
                raise ValueError(f"malformed request {request!r} with {len(fds)} fds")
        except Exception:
            # Only the caller can reach this socket; a malformed request is
            # a bug on its side and must not take down the other containers.
            for fd in fds:
                os.close(fd)
            return
        handshake_fd, status_fd = fds
        status = socket.socket(fileno=status_fd)
        status.setblocking(False)
        try:
            self.spawn(request, handshake_fd, status)
        finally:
            os.close(handshake_fd)

    def spawn(self, request: SpawnRequest, handshake_fd: int, status: socket.socket) -> None:
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = _kernel.clone(request.clone_flags | signal.SIGCHLD)
        except OSError as exc:
            os.close(go_r)
            os.close(go_w)
            self.send(status, SpawnFailed(ExceptionInfo.capture(exc)))
            status.close()
            return
        if pid == 0:
            os.close(go_w)
            container_main(handshake_fd, go_r)
        os.close(go_r)
        self.status[pid] = status
        try:
            if request.id_map is not None:
                write_id_maps(
                    pid,
                    guest_uid=request.id_map.guest_uid,
                    guest_gid=request.id_map.guest_gid,
                    host_uid=os.geteuid(),
                    host_gid=os.getegid(),
                    count=request.id_map.count,
                )
            # The child cannot be reaped before this loop calls waitpid, so
            # its PID cannot have been recycled yet: the pidfd is the child's.
            pidfd = _kernel.pidfd_open(pid)
            try:
                sent = self.send(status, Forked(pid), [pidfd])
            finally:
                os.close(pidfd)
            if not sent:
                raise BrokenPipeError("the caller no longer waits for this container")
            os.write(go_w, b"g")
        except Exception as exc:
            # The child sees end-of-file on the go pipe and exits; its
            # status still goes to the caller once it is reaped.
            self.send(status, SpawnFailed(ExceptionInfo.capture(exc)))
            os.kill(pid, signal.SIGKILL)
        finally:
            os.close(go_w)

    def send(self, status: socket.socket, message: object, fds: list[int] | None = None) -> bool:
        """Send a status frame without blocking; False if the caller is gone or not reading."""
        data = encode_frame(message, len(fds or ()))
        try:
            return status.sendmsg([data], fds_ancillary(fds or ())) == len(data)
        except OSError:
            return False

    def reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            status = self.status.pop(pid, None)
            if status is not None:
                self.send(status, Exited(os.waitstatus_to_exitcode(wait_status)))
                status.close()

    def shut_down(self) -> None:
        """Kill and reap every container still running; nobody can wait for them any more."""
        for pid in self.status:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while self.status:
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            status = self.status.pop(pid, None)
            if status is not None:
                self.send(status, Exited(os.waitstatus_to_exitcode(wait_status)))
                status.close()


def serve(control_fd: int, parent_pid: int, die_with_parent: bool) -> NoReturn:
    """Serve spawn requests on the inherited `control_fd` until it reaches end-of-file."""
    if die_with_parent:
        _kernel.prctl(_kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died before prctl() took effect.
        if os.getppid() != parent_pid:
            os._exit(0)
    _kernel.set_process_name("ac-forkserver")
    # Ctrl-C in a terminal signals the whole foreground process group; the
    # caller decides what happens to its containers, not the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    # One status socket per live container: allow as many as the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    _Server(control).run()
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str]) -> NoReturn:
    """Entry point of the exec'd server: ARGV is CONTROL_FD PARENT_PID DIE_WITH_PARENT."""
    control_fd, parent_pid, die_with_parent = argv
    serve(int(control_fd), int(parent_pid), die_with_parent == "1")
