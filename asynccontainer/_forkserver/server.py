"""The fork server: a small, single-threaded process that clones every container.

It is exec'd fresh by the caller (see `_client`), never forked from it: the
caller may be multi-threaded (fork would copy locks held by other threads,
and unshare(CLONE_NEWUSER) refuses multi-threaded callers with EINVAL) and
large (fork time grows with the caller's page tables). It imports nothing but
the standard library and this package's synchronous modules (attrs only for
limits, a veth or a Python child).

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

import errno
import os
import pickle
import resource
import select
import selectors
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from .. import _kernel
from .._kernel.cgroups import Hierarchy, TrackedCgroup, hierarchies
from .._wire import (
    Emptied,
    ExceptionInfo,
    Exited,
    Forked,
    KillRequest,
    SpawnFailed,
    SpawnRequest,
    encode_frame,
    fds_ancillary,
    recvmsg_fds,
)
from . import cexec
from .cgroupfs import ContainerCgroup, remove_server_tree, sweep_stale
from .idmaps import write_id_maps
from .lifetime import Tracking, clone_into, move_in

if TYPE_CHECKING:
    from .._spec.network import VethNetwork

__all__ = ["main", "serve"]

# Zygotes kept at most: one per kind of container (clone flags) in use.
_MAX_ZYGOTES = 4

# How long a reap waits for a lingering cgroup's last tasks to leave it
# once none is alive (rmdir fails with EBUSY until then).
_EMPTY_WAIT = 0.05

# A request is a pickled SpawnRequest of a few hundred bytes.
_MAX_REQUEST = 65536

# fds kept free: enough to receive a request (two), clone, answer, and make
# cgroups or a veth pair on the way.
_FD_MARGIN = 16


class _Server:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.selector = selectors.DefaultSelector()
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The container's status socket, by PID, until it is reaped.
        self.status: dict[int, socket.socket] = {}
        # The cgroups of containers with limits, by PID, until reaped.
        self.cgroups: dict[int, ContainerCgroup] = {}
        # Every container's and zygote's cgroup of its own (_forkserver.
        # lifetime), by PID until reaped; then, while processes it forked
        # still run there, with the status socket of a caller who may kill
        # them (None once it closed its end).
        self.tracking: Tracking | None = None
        self.tracking_chosen = False
        self.tracked: dict[int, TrackedCgroup] = {}
        self.lingering: dict[TrackedCgroup, socket.socket | None] = {}
        # Containers whose caller closed its status socket while they ran.
        self.abandoned: set[int] = set()
        # The veth pairs of containers with network="veth", by PID.
        self.veths: dict[int, VethNetwork] = {}
        # The cgroup hierarchies and the server's cgroup in each, read on
        # the first limits= request: the server is never moved.
        self.hierarchies: list[Hierarchy] | None = None
        # Children cloned ahead of need ("zygotes"), by clone flags: (PID, go
        # socket). Cloning is the costliest step of a start (page tables,
        # namespaces, the child's first scheduling); done while the server
        # is idle, it is off the path of the next request with those flags.
        self.zygotes: dict[int, tuple[int, socket.socket]] = {}
        # Flags served since the server was last idle: a zygote is wanted.
        self.wanted: set[int] = set()
        # The C executor (None where it was not built), and the mappings of
        # its children by the read end of their lifetime pipe: freed at its
        # end-of-file (the exec, or the exit).
        self.cexec = cexec.load()
        self.mappings: dict[int, int] = {}
        self.running = True
        # What is open when the loop starts: stdio, the control socket, the
        # selector, the wakeup pipe, libraries' own.
        self.base_fds = len(os.listdir("/proc/self/fd"))

    def run(self) -> None:
        # SIGCHLD wakes the loop through the wakeup fd (PEP 475 retries the
        # interrupted call); reaping happens in the loop, not in a handler.
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.selector.register(self.control, selectors.EVENT_READ)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ)
        while self.running:
            events = self.selector.select(0 if self.wanted else None)
            if not events and self.wanted:
                self.prepare_zygote(self.wanted.pop())
                continue
            for key, _ in events:
                if key.fileobj is self.control:
                    self.receive_request()
                elif key.data == "mapping":
                    self.free_mapping(key.fd)
                elif key.fileobj == self.wakeup_r:
                    while True:
                        try:
                            if not os.read(self.wakeup_r, 4096):
                                break
                        except BlockingIOError:
                            break
                else:
                    self.receive_status(key)
            self.reap()
        self.shut_down()

    def receive_status(self, key: selectors.SelectorKey) -> None:
        """Handle a byte on a status socket (kill all of the container), or its end-of-file."""
        status = key.fileobj
        assert isinstance(status, socket.socket)
        try:
            data = status.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        target = key.data
        if isinstance(target, TrackedCgroup):
            # Reaped, with processes left: killed on request, and when nobody
            # holds the container any more.
            target.kill()
            if not data:
                self.selector.unregister(status)
                status.close()
                self.lingering[target] = None
            return
        if data:
            self.kill(target)
        else:
            # Dropped while it runs (as a Popen may be): it goes on, and what
            # it leaves at its exit is killed then.
            self.selector.unregister(status)
            self.abandoned.add(target)

    def choose_tracking(self) -> Tracking | None:
        """Return the hierarchy to track containers in, chosen on first use, or None."""
        if not self.tracking_chosen:
            self.tracking_chosen = True
            if self.hierarchies is None:
                try:
                    self.hierarchies = hierarchies()
                except OSError:
                    self.hierarchies = []
            self.tracking = Tracking.choose(self.hierarchies, os.getpid())
        return self.tracking

    def receive_request(self) -> None:
        try:
            data, fds, lost = recvmsg_fds(self.control, _MAX_REQUEST)
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
            if isinstance(request, KillRequest) and not fds:
                self.kill(request.pid)
                return
            if not isinstance(request, SpawnRequest) or len(fds) != 2 or lost:
                raise ValueError(f"malformed request {request!r} with {len(fds)} fds")
        except Exception:
            # Only the caller can reach this socket; a malformed request is
            # a bug on its side, and a request whose fds were lost (no free
            # fd here: the margin below keeps that from happening) cannot be
            # answered; neither may take down the other containers. The
            # caller sees its status socket closed.
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

    def cgroup_for(self, into: TrackedCgroup | None) -> tuple[TrackedCgroup | None, bool]:
        """Return the cgroup to clone a child into, and whether it was made for it here.

        `into` (the cgroup of the container an excursion enters) if given;
        else a new one of the child's own when the server can track; else
        None.
        """
        if into is not None:
            return into, False
        tracking = self.choose_tracking()
        return (None, False) if tracking is None else (tracking.create(), True)

    def clone(self, flags: int, into: TrackedCgroup | None = None) -> tuple[int, socket.socket]:
        """Clone a container process that waits for its go; return (PID, go socket).

        It starts in a new cgroup of its own (when the server can track),
        or in `into`, the cgroup of the container an excursion enters.
        """
        entry = _python_child()  # imported before the fork, not in each child
        go, child_go = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        owned = None
        try:
            cgroup, made = self.cgroup_for(into)
            owned = cgroup if made else None
            if cgroup is None:
                pid = _kernel.clone(flags | signal.SIGCHLD)
            else:
                pid = clone_into(flags | signal.SIGCHLD, cgroup)
        except BaseException:
            go.close()
            child_go.close()
            if owned is not None:
                owned.remove()
            raise
        if pid == 0:
            entry(child_go.fileno())
        child_go.close()
        if owned is not None:
            self.tracked[pid] = owned
        return pid, go

    def clone_c(self, flags: int, into: TrackedCgroup | None) -> tuple[int, socket.socket]:
        """Clone a child of the C executor that waits for its go; return (PID, go socket).

        It shares this process's memory, on a mapping of its own that is
        freed when its lifetime pipe ends; cloned into its cgroup as `clone`
        does.
        """
        assert self.cexec is not None
        go, child_go = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lifetime, child_lifetime = os.pipe2(os.O_CLOEXEC)
        owned = address = None
        try:
            cgroup, made = self.cgroup_for(into)
            owned = cgroup if made else None
            address = self.cexec.map()
            fd = cgroup.open() if cgroup is not None and cgroup.version == 2 else -1
            try:
                pid = self.cexec.spawn(flags, fd, child_go.fileno(), child_lifetime, address)
            finally:
                if fd >= 0:
                    os.close(fd)
            if cgroup is not None and cgroup.version == 1:
                move_in(cgroup, pid)  # a child it cannot move is reaped, off the mapping
        except BaseException:
            go.close()
            os.close(lifetime)
            if address is not None:
                self.cexec.unmap(address)  # no child runs on it (any more)
            if owned is not None:
                owned.remove()
            raise
        finally:
            child_go.close()
            os.close(child_lifetime)
        self.mappings[lifetime] = address
        self.selector.register(lifetime, selectors.EVENT_READ, "mapping")
        if owned is not None:
            self.tracked[pid] = owned
        return pid, go

    def free_mapping(self, lifetime: int) -> None:
        """Free a C child's mapping: its lifetime pipe ended (it exec'd, or all on it exited)."""
        try:
            if os.read(lifetime, 1):
                return  # nothing is ever written; end-of-file is the news
        except BlockingIOError:
            return
        self.selector.unregister(lifetime)
        os.close(lifetime)
        address = self.mappings.pop(lifetime)
        assert self.cexec is not None
        self.cexec.unmap(address)

    def prepare_zygote(self, flags: int) -> None:
        """Clone a zygote for `flags` (the server is idle), keeping a few kinds at most."""
        if flags in self.zygotes:
            return
        if len(self.zygotes) >= _MAX_ZYGOTES:
            oldest = next(iter(self.zygotes))
            self.discard_zygote(oldest)
        try:
            self.zygotes[flags] = self.clone(flags)
        except OSError:
            pass  # a limit (ENOSPC, ENOMEM): the next request clones, and reports it

    def discard_zygote(self, flags: int) -> None:
        """Close a zygote's go socket, which makes it exit; the reaper collects it."""
        _, go = self.zygotes.pop(flags)
        go.close()

    def take_zygote(self, flags: int) -> tuple[int, socket.socket] | None:
        """Return the zygote for `flags` if there is one and it is alive."""
        zygote = self.zygotes.pop(flags, None)
        if zygote is None:
            return None
        _, go = zygote
        poller = select.poll()
        poller.register(go, select.POLLHUP | select.POLLERR)
        if poller.poll(0):
            go.close()  # it died; the reaper collects it
            return None
        return zygote

    def kill(self, pid: int) -> None:
        """SIGKILL a container not reaped yet (its PID is still its own) and all in its cgroup."""
        if pid in self.status:
            tracked = self.tracked.get(pid)
            if tracked is not None:
                tracked.kill()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def short_of_fds(self) -> bool:
        """Return True when a start could leave too few fds to receive the next request.

        Each live container holds one fd here (its status socket), each
        zygote one (its go socket); a start needs a few for a moment (a
        socket pair to clone, a pidfd, cgroup files, netlink for a veth).
        Refusing with EMFILE while _FD_MARGIN are free keeps every request
        received whole, and answered.
        """
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = self.base_fds + len(self.status) + len(self.zygotes) + len(self.lingering)
        return soft - in_use < _FD_MARGIN

    def start_child(self, request: SpawnRequest) -> tuple[int, socket.socket]:
        """Return (PID, go socket) of a child for `request`: a zygote, a clone, or a C child.

        Raises:
            OSError: as the clone fails; ENOEXEC for a plan of the C
                executor this server could not load.
        """
        flags = request.clone_flags
        # An excursion starts in the cgroup of the container it enters (as
        # docker exec does): cloned there, not a zygote moved in, which would
        # wait for an RCU grace period (see _kernel.clone).
        into = self.tracked.get(request.cgroup_of) if request.cgroup_of else None
        if request.executor == "c":
            if self.cexec is None:
                raise OSError(
                    errno.ENOEXEC,
                    f"the fork server could not load the C executor ({cexec.LIBRARY}); "
                    "set ASYNCCONTAINER_EXECUTOR=python, or reinstall",
                )
            return self.clone_c(flags, into)
        zygote = None if into is not None else self.take_zygote(flags)
        if into is None:
            self.wanted.add(flags)
        return zygote or self.clone(flags, into)

    def spawn(self, request: SpawnRequest, handshake_fd: int, status: socket.socket) -> None:
        if self.short_of_fds():
            error = OSError(
                errno.EMFILE,
                f"the fork server has too few file descriptors left for another container "
                f"({len(self.status)} run, each holding one there); raise its hard limit "
                "(RLIMIT_NOFILE, `ulimit -Hn`) or run fewer containers at once",
            )
            self.send(status, SpawnFailed(ExceptionInfo.capture(error)))
            status.close()
            return
        try:
            pid, go = self.start_child(request)
        except OSError as exc:
            self.send(status, SpawnFailed(ExceptionInfo.capture(exc)))
            status.close()
            return
        self.status[pid] = status
        self.selector.register(status, selectors.EVENT_READ, pid)
        try:
            if request.id_map is not None:
                write_id_maps(
                    pid,
                    guest_uid=request.id_map.guest_uid,
                    guest_gid=request.id_map.guest_gid,
                    host_uid=os.geteuid(),
                    host_gid=os.getegid(),
                    count=request.id_map.size,
                )
            if request.limits is not None:
                # Before the go: nothing of the container runs outside them.
                if self.hierarchies is None:
                    self.hierarchies = hierarchies()
                tracked = self.tracked.get(pid)
                v2 = tracked.path if tracked is not None and tracked.version == 2 else None
                cgroup = ContainerCgroup(
                    request.limits, os.getpid(), f"c{pid}", self.hierarchies, v2
                )
                self.cgroups[pid] = cgroup
                cgroup.add(pid)
            entered = self.cgroups.get(request.cgroup_of) if request.cgroup_of else None
            if entered is not None:
                # The container's limits= apply to what is run inside it
                # (in v1 hierarchies: it was cloned into the v2 one).
                entered.add(pid)
            network = None
            if request.network == "veth":
                # Imported here: only a veth needs ipaddress and attrs (the start stays small).
                from .veth import create_veth

                taken = {veth.subnet for veth in self.veths.values()}
                network = self.veths[pid] = create_veth(pid, taken)
            # The child cannot be reaped before this loop calls waitpid, so
            # its PID cannot have been recycled yet: the pidfd is the child's.
            pidfd = _kernel.pidfd_open(pid)
            try:
                sent = self.send(status, Forked(pid, network), [pidfd])
            finally:
                os.close(pidfd)
            if not sent:
                raise BrokenPipeError("the caller no longer waits for this container")
            go.sendmsg([b"g"], fds_ancillary([handshake_fd]))
        except Exception as exc:
            # The child sees end-of-file on its go socket and exits; its
            # status still goes to the caller once it is reaped.
            self.send(status, SpawnFailed(ExceptionInfo.capture(exc)))
            os.kill(pid, signal.SIGKILL)
        finally:
            go.close()

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
            self.report_exit(pid, wait_status)
            for flags, (zygote, _) in list(self.zygotes.items()):
                if zygote == pid:
                    self.discard_zygote(flags)  # killed from outside
            # The last process of a lingering cgroup, at its exit, is a child
            # of the server (it was adopted, at the latest): checked here.
            self.check_lingering()

    def check_lingering(self) -> None:
        """Remove the lingering cgroups left empty, and tell their callers."""
        for tracked, status in list(self.lingering.items()):
            if not tracked.remove(wait=_EMPTY_WAIT):
                continue
            del self.lingering[tracked]
            if status is not None:
                self.send(status, Emptied())
                self.selector.unregister(status)
                status.close()

    def shut_down(self) -> None:
        """Kill and reap every container still running; nobody can wait for them any more."""
        for flags in list(self.zygotes):
            self.discard_zygote(flags)
        for tracked in [*self.tracked.values(), *self.lingering]:
            tracked.kill()
        # Every child is killed: the containers, the zygotes (released, they
        # would exit anyway) and the orphans adopted as subreaper. A child
        # that forks while dying may leave one more orphan here: every child
        # is killed again before each reap.
        while True:
            for pid in {*self.status, *_children()}:
                _kill(pid)
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.report_exit(pid, wait_status)
        for tracked, status in self.lingering.items():
            tracked.end()
            if status is not None:
                self.send(status, Emptied())
                status.close()
        self.lingering.clear()
        remove_server_tree(os.getpid())

    def report_exit(self, pid: int, wait_status: int) -> None:
        """Send a reaped container's exit (and usage) to its caller; remove its cgroups."""
        # Deleted before the exit is told: the caller may reuse its address
        # at once (tests/test_network.py).
        self.delete_veth_of(pid)
        cgroup = self.cgroups.pop(pid, None)
        usage = None
        if cgroup is not None:
            try:
                usage = cgroup.usage()
            except (OSError, ValueError):
                pass  # a cgroup removed from outside: no usage to report
        tracked = self.tracked.pop(pid, None)
        # With a pid namespace its cgroup is empty now; without one, what
        # it forked may live on, for as long as its caller lets it.
        lingering = tracked is not None and tracked.populated()
        abandoned = pid in self.abandoned
        self.abandoned.discard(pid)
        status = self.status.pop(pid, None)
        if status is not None:
            self.send(status, Exited(os.waitstatus_to_exitcode(wait_status), usage, lingering))
        # The caller knows now; the rmdirs (0.1 ms each) need not delay it.
        if cgroup is not None:
            cgroup.remove()
        if tracked is not None and not lingering and not tracked.remove():
            tracked.kill()  # populated again, or never emptied: a process raced its exit
            self.lingering[tracked] = None
        if status is None:
            return
        if lingering and not abandoned:
            assert tracked is not None
            self.selector.modify(status, selectors.EVENT_READ, tracked)
            self.lingering[tracked] = status
            return
        if not abandoned:
            self.selector.unregister(status)
        status.close()
        if lingering:
            assert tracked is not None
            tracked.kill()  # nobody holds the container any more
            self.lingering[tracked] = None

    def delete_veth_of(self, pid: int) -> None:
        """Delete an exited container's veth, if it has one."""
        veth = self.veths.pop(pid, None)
        if veth is not None:
            from .veth import delete_veth

            try:
                delete_veth(veth.host_interface)
            except Exception:
                pass  # gone with the namespace already


def _python_child() -> Callable[[int], NoReturn]:
    """Return the Python executor's entry point, importing it on first use.

    The C executor needs none of it, so the server starts without it (a
    first container is that much sooner); `clone` imports it before it
    forks, so every Python child has it, and cloudpickle (to unpickle
    callables and send back exceptions), before its root changes. The
    plan's steps too: a Python child unpickles its plan, and importing
    them (and attrs) once here spares every child that import.
    """
    from .._plan import steps  # noqa: F401
    from .zygote import container_main

    return container_main


def _children() -> list[int]:
    """Return the server's children, from /proc (proc(5), /proc/pid/task/tid/children)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as file:
            return [int(field) for field in file.read().split()]
    except OSError:
        return []  # no /proc: the known containers are still killed


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def serve(control_fd: int, parent_pid: int, die_with_parent: bool) -> NoReturn:
    """Serve spawn requests on the inherited `control_fd` until it reaches end-of-file."""
    if die_with_parent:
        _kernel.prctl(_kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died before prctl() took effect.
        if os.getppid() != parent_pid:
            os._exit(0)
    _kernel.set_process_name("ac-forkserver")
    # An orphan is reparented to its nearest subreaper ancestor, else to the
    # init of its parent's pid namespace (prctl(2), PR_SET_CHILD_SUBREAPER).
    # Without this, the child of an excursion killed mid-run, or a daemon of
    # a container without a pid namespace, goes to the caller's init: when
    # the caller is PID 1 of its own container (a Python app in Docker), a
    # zombie nobody reaps, and a container's PID 1 dying waits for every
    # process of its namespace to be reaped (zap_pid_ns_processes), so stop()
    # hangs. Adopted here, they are reaped with the rest, and killed at
    # shutdown.
    _kernel.prctl(_kernel.PR_SET_CHILD_SUBREAPER, 1)
    # Ctrl-C in a terminal signals the whole foreground process group; the
    # caller decides what happens to its containers, not the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    # One status socket per live container: allow as many as the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # What servers killed before their shutdown left behind.
    sweep_stale()
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    _Server(control).run()
    os._exit(0)


def main(argv: list[str]) -> NoReturn:
    """Entry point of the exec'd server: ARGV is CONTROL_FD PARENT_PID DIE_WITH_PARENT."""
    control_fd, parent_pid, die_with_parent = argv
    serve(int(control_fd), int(parent_pid), die_with_parent == "1")
