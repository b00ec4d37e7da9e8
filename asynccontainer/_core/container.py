"""run_container, call_with_container and the Container handle.

Every argument is checked here, in the caller, before anything is spawned;
then one request goes to the fork server and the rest of the set-up is
awaited on the container's handshake socket. See docs/design.md for the
whole exchange.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, Self, TypeAlias

import anyio
import attrs

from .. import _kernel
from .._errors import ContainerError
from .._plan import ContainerConfig
from .._spec.capabilities import DEFAULT_CAPABILITIES, capability_numbers
from .._spec.filesystems import FileSystem, FileSystemMapping, MountItem, Symlink
from .._spec.limits import ResourceUsage, check_limits, plan_cgroups, require_pid_namespace
from .._spec.namespaces import NAMESPACES, namespace_clone_flags, normalize_namespaces
from .._spec.network import VethNetwork, check_network
from .._spec.seccomp import DEFAULT_SECCOMP, SeccompPolicy, compile_policy
from .._wire import (
    MAX_FDS,
    ContainerSetup,
    Execing,
    Exited,
    Forked,
    IdMap,
    Ready,
    SetupFailed,
    SpawnFailed,
    SpawnRequest,
)
from .client import (
    AsyncFrameChannel,
    rebuild_exception,
    receive_status,
    send_request,
)

__all__ = ["Container", "Target", "call_with_container", "run_container"]

Target: TypeAlias = Sequence[str | os.PathLike[str]] | Callable[[], object]
"""A command (argv, run with execvp semantics) or a callable taking no arguments."""

Stdio: TypeAlias = int | IO[Any] | None

# How long cleanup after a cancellation or an error may wait for the server
# to report the exit of a SIGKILLed container. Reaping takes milliseconds;
# past this the server itself is wedged, and waiting longer helps nobody.
_REAP_TIMEOUT = 30.0

# sethostname(2): HOST_NAME_MAX.
_HOST_NAME_MAX = 64
# user_namespaces(7): ids are 32-bit and (uid_t)-1 is never valid.
_MAX_ID = 2**32 - 2


class Container:
    """A running (or finished) container, as returned by `run_container`.

    Like `subprocess.Popen`, it does not stop the container when it is
    garbage-collected: use `async with`, `stop`, or `wait`. Signals go
    through a pidfd, so they never reach a process that merely reuses the
    container's PID after it was reaped.
    """

    def __init__(self, pid: int, pidfd: int, status: AsyncFrameChannel) -> None:
        self._pid = pid
        self._pidfd: int | None = pidfd
        self._status: AsyncFrameChannel | None = status
        self._returncode: int | None = None
        self._wait_lock = anyio.Lock()
        self._root_fd: int | None = None
        self._usage: ResourceUsage | None = None
        self._network: VethNetwork | None = None

    def _set_root(self, fd: int) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
        self._root_fd = fd

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
                    raise
                if isinstance(message, Exited):
                    self._usage = message.usage
                    self._finish(message.returncode)
        return self._returncode

    def _finish(self, returncode: int) -> None:
        self._returncode = returncode
        self._close()

    def _close(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
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
        """Send SIGKILL, which always ends the container."""
        self.send_signal(signal.SIGKILL)

    async def stop(self, grace: float = 5.0) -> int:
        """Send SIGTERM, then SIGKILL if it still runs after `grace` seconds; return the returncode.

        If `stop` is cancelled, the container is killed and reaped before
        the cancellation propagates.

        Raises:
            ValueError: if `grace` is negative or not a number.
        """
        _check_duration("grace", grace)
        if self._returncode is not None:
            return self._returncode
        try:
            self.terminate()
            with anyio.move_on_after(grace):
                return await self.wait()
            self.kill()
            return await self.wait()
        except BaseException:
            await self._kill_and_reap()
            raise

    async def _kill_and_reap(self) -> None:
        """Kill and wait, shielded from cancellation (bounded by _REAP_TIMEOUT)."""
        if self._returncode is not None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_REAP_TIMEOUT):
            self.kill()
            try:
                await self.wait()
            except ContainerError:
                pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Kill and reap the container if it still runs, also on cancellation."""
        await self._kill_and_reap()

    def __del__(self) -> None:
        if self._returncode is None and self._pidfd is not None:
            warnings.warn(
                f"{self!r} was garbage-collected while running; use 'async with' or "
                "await stop() or wait()",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )
        self._close()


def _check_duration(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be zero or more seconds, not {value!r}")


def _pickle_callable(what: str, function: Callable[[], object]) -> bytes:
    import cloudpickle

    try:
        pickled: bytes = cloudpickle.dumps(function)
        return pickled
    except Exception as exc:
        raise TypeError(
            f"the {what} {function!r} cannot be pickled to be sent to the container: "
            f"{exc}. Make it refer only to picklable objects (no locks, sockets or "
            "open files), or pass a command instead"
        ) from exc


def _check_command(target: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    if isinstance(target, str | bytes):
        raise TypeError(
            f"a command is a sequence of arguments, not the string {target!r}; "
            f"write [{target!r}], or ['sh', '-c', {target!r}] for a shell command line"
        )
    try:
        command = tuple(os.fspath(argument) for argument in target)
    except TypeError as exc:
        raise TypeError(
            f"a target is a command (a sequence of str) or a callable, not {target!r}"
        ) from exc
    if not command:
        raise ValueError("the command is empty; give at least the program to run")
    for argument in command:
        if not isinstance(argument, str):
            raise TypeError(f"command arguments are str, not {argument!r}")
        if "\0" in argument:
            raise ValueError(f"command argument {argument!r} contains a NUL byte")
    return command


def _check_mounts(mounts: Iterable[MountItem]) -> tuple[MountItem, ...]:
    if isinstance(mounts, FileSystem | FileSystemMapping | Symlink):
        raise TypeError("mounts is a sequence of mount items; wrap a single one as (item,)")
    items = tuple(mounts)
    for item in items:
        if not isinstance(item, FileSystem | FileSystemMapping | Symlink):
            raise TypeError(
                f"mounts holds FileSystem, FileSystemMapping or Symlink items, not {item!r}"
            )
    return items


def _compile_seccomp(
    seccomp: SeccompPolicy | None, no_new_privs: bool, namespaces: frozenset[str]
) -> bytes | None:
    if seccomp is not None and not isinstance(seccomp, SeccompPolicy):
        raise TypeError(f"seccomp is a SeccompPolicy or None, not {seccomp!r}")
    if seccomp is not None and not no_new_privs and "user" not in namespaces and os.geteuid():
        # seccomp(2): without no_new_privs, loading a filter takes
        # CAP_SYS_ADMIN, which only root or a user namespace gives.
        raise ValueError(
            "a seccomp filter without no_new_privs needs root or a user namespace; "
            "keep no_new_privs=True or pass seccomp=None"
        )
    return None if seccomp is None else compile_policy(seccomp)


def _check_pass_fds(pass_fds: Iterable[int]) -> tuple[int, ...]:
    if isinstance(pass_fds, int):
        raise TypeError("pass_fds is a sequence of fds; wrap a single one as (fd,)")
    fds = tuple(pass_fds)
    for fd in fds:
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError(f"pass_fds holds fd numbers, not {fd!r}")
        if fd < 3:
            raise ValueError(f"pass_fds: {fd} is stdio; give it as stdin, stdout or stderr")
        try:
            os.fstat(fd)
        except OSError:
            raise ValueError(f"pass_fds: {fd} is not an open file descriptor") from None
    if len(set(fds)) != len(fds):
        raise ValueError(f"pass_fds {fds} names an fd twice")
    if len(fds) > MAX_FDS - 3:
        raise ValueError(f"pass_fds: at most {MAX_FDS - 3} fds may be passed")
    return fds


def _check_env(env: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    if env is None:
        # Guix's purify-environment: the container starts with nothing.
        return ()
    pairs = []
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env maps str to str, not {key!r} to {value!r}")
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"env variable name {key!r} or its value is not valid")
        pairs.append((key, value))
    return tuple(pairs)


def _check_id(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if not 0 <= value <= _MAX_ID:
        raise ValueError(f"{name} must be between 0 and {_MAX_ID}, not {value}")
    return value


class _StdioFds:
    """The three fds a container starts with, and the ones opened only to pass them."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.opened: list[int] = []

    def add(self, name: str, number: int, value: Stdio) -> None:
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
                    f"{name}={value} is not supported; pass None, an fd, a file object "
                    "or subprocess.DEVNULL (for output, a pipe from os.pipe())"
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

    def close(self) -> None:
        for fd in self.opened:
            os.close(fd)


def _build(
    target: Target,
    *,
    root: str | os.PathLike[str] | None,
    mounts: Iterable[MountItem],
    namespaces: Iterable[str],
    host_uids: int,
    guest_uid: int,
    guest_gid: int,
    writable_root: bool,
    populate: Callable[[], object] | None,
    loopback_network: bool,
    lock_mounts: bool,
    hostname: str | None,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str],
    child_is_pid1: bool = True,
    new_session: bool = True,
    no_new_privs: bool = True,
    pass_fds: Iterable[int] = (),
    seccomp: SeccompPolicy | None = DEFAULT_SECCOMP,
    capabilities: Iterable[str] | None = DEFAULT_CAPABILITIES,
    limits: Mapping[str, object] | None = None,
    network: str | None = None,
) -> tuple[ContainerConfig, SpawnRequest]:
    """Check every argument of run_container and return what is sent.

    Raises:
        TypeError, ValueError: naming the argument and what to pass instead.
        FileNotFoundError, NotADirectoryError: for a `root` that is not a directory.
    """
    names = normalize_namespaces(namespaces)
    items = _check_mounts(mounts)
    for flag_name, flag in (
        ("writable_root", writable_root),
        ("loopback_network", loopback_network),
        ("lock_mounts", lock_mounts),
        ("child_is_pid1", child_is_pid1),
        ("new_session", new_session),
        ("no_new_privs", no_new_privs),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be True or False, not {flag!r}")
    if not child_is_pid1 and "pid" not in names:
        raise ValueError(
            "child_is_pid1=False puts an init in front of the target as PID 1 of a new pid "
            "namespace; add 'pid' to namespaces"
        )

    if callable(target):
        command = None
        pickled_callable: bytes | None = _pickle_callable("target", target)
    else:
        command = _check_command(target)
        pickled_callable = None

    root_path = None
    if root is not None:
        root_path = os.path.abspath(os.fspath(root))
        if not os.path.exists(root_path):
            raise FileNotFoundError(2, "the root directory does not exist", root_path)
        if not os.path.isdir(root_path):
            raise NotADirectoryError(20, "the root must be a directory", root_path)
    if "mnt" not in names:
        needing_mnt: tuple[tuple[str, object], ...] = (
            ("root", root),
            ("mounts", items),
            ("populate", populate),
        )
        for needing, given in needing_mnt:
            if given:
                raise ValueError(
                    f"{needing}= needs the 'mnt' namespace: without it the container shares "
                    "the host's mounts; add 'mnt' to namespaces"
                )
    if populate is not None and not callable(populate):
        raise TypeError(f"populate must be a callable taking no arguments, not {populate!r}")

    if isinstance(host_uids, bool) or not isinstance(host_uids, int):
        raise TypeError(f"host_uids must be an int, not {host_uids!r}")
    if host_uids < 1:
        raise ValueError(f"host_uids must be 1 or more, not {host_uids}")
    _check_id("guest_uid", guest_uid)
    _check_id("guest_gid", guest_gid)
    if "user" in names:
        if host_uids > 1 and os.geteuid() != 0:
            raise ValueError(
                f"host_uids={host_uids}: only root may map more than one id into a user "
                "namespace (user_namespaces(7)); use host_uids=1 or run as root"
            )
        if max(guest_uid, guest_gid) + host_uids - 1 > _MAX_ID:
            raise ValueError("guest ids plus host_uids run past the largest id")
        id_map: IdMap | None = IdMap(guest_uid, guest_gid, host_uids)
    else:
        if (host_uids, guest_uid, guest_gid) != (1, 0, 0):
            raise ValueError(
                "host_uids, guest_uid and guest_gid describe the id maps of a user namespace; "
                "add 'user' to namespaces or leave them at their defaults"
            )
        id_map = None

    if hostname is not None:
        if not isinstance(hostname, str):
            raise TypeError(f"hostname must be a str, not {hostname!r}")
        if "uts" not in names:
            raise ValueError(
                "hostname= needs the 'uts' namespace, or it would rename the host; "
                "add 'uts' to namespaces"
            )
        if not hostname or len(hostname.encode()) > _HOST_NAME_MAX or "\0" in hostname:
            raise ValueError(
                f"hostname {hostname!r} must be 1 to {_HOST_NAME_MAX} bytes without NUL"
            )
    cgroup_limits = None
    if limits is not None:
        cgroup_limits = check_limits(limits)
        require_pid_namespace(names)
        # Unwritable cgroups or a missing controller, reported before the
        # spawn; the server checks again as it creates them.
        plan_cgroups(cgroup_limits)
    cwd_path = os.fspath(cwd)
    if not isinstance(cwd_path, str) or not cwd_path.startswith("/"):
        raise ValueError(f"cwd {cwd!r} must be an absolute path inside the container")

    config = ContainerConfig(
        namespaces=names,
        root=root_path,
        mounts=items,
        writable_root=writable_root,
        loopback_network=loopback_network,
        lock_mounts=lock_mounts,
        hostname=hostname,
        env=_check_env(env),
        cwd=cwd_path,
        command=command,
        pickled_callable=pickled_callable,
        pickled_populate=_pickle_callable("populate hook", populate) if populate else None,
        sys_path=tuple(sys.path) if pickled_callable or populate else (),
        child_is_pid1=child_is_pid1,
        new_session=new_session,
        no_new_privs=no_new_privs,
        pass_fds=_check_pass_fds(pass_fds),
        seccomp_program=_compile_seccomp(seccomp, no_new_privs, names),
        capabilities=None if capabilities is None else capability_numbers(capabilities),
        # The default set keeps what it can: a caller without root and
        # without a user namespace holds none of it.
        capabilities_required=capabilities is not DEFAULT_CAPABILITIES,
    )
    flags = namespace_clone_flags(names)
    if cgroup_limits is not None and "cgroup" in names:
        # The child unshares it once it is in its own cgroups (see _cgroups).
        flags &= ~_kernel.CLONE_NEWCGROUP
        config = attrs.evolve(config, cgroup_namespace=True)
    return config, SpawnRequest(flags, id_map, cgroup_limits, check_network(network, names))


async def run_container(
    target: Target,
    *,
    root: str | os.PathLike[str] | None = None,
    mounts: Iterable[MountItem] = (),
    namespaces: Iterable[str] = NAMESPACES,
    host_uids: int = 1,
    guest_uid: int = 0,
    guest_gid: int = 0,
    writable_root: bool = False,
    populate: Callable[[], object] | None = None,
    loopback_network: bool = True,
    lock_mounts: bool = True,
    hostname: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] = "/",
    stdin: Stdio = None,
    stdout: Stdio = None,
    stderr: Stdio = None,
    child_is_pid1: bool = True,
    new_session: bool = True,
    no_new_privs: bool = True,
    pass_fds: Iterable[int] = (),
    seccomp: SeccompPolicy | None = DEFAULT_SECCOMP,
    capabilities: Iterable[str] | None = DEFAULT_CAPABILITIES,
    limits: Mapping[str, object] | None = None,
    network: str | None = None,
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
        root: None for a fresh tmpfs root (as Guix); or an existing directory
            of the host to use as the root (missing mount points are created
            in it).
        mounts: FileSystem, FileSystemMapping or Symlink items, mounted in
            order after the essential file systems (/proc, /dev ...).
        namespaces: names from `NAMESPACES`; all of them by default.
        host_uids: how many ids, from the caller's uid/gid up, are mapped
            into the user namespace (more than 1 needs root).
        guest_uid: the uid the caller's uid becomes inside.
        guest_gid: the gid the caller's gid becomes inside.
        writable_root: leave the root writable (else EROFS on writes).
        populate: a callable run inside after pivot_root, before the root
            turns read-only, to create files in it.
        loopback_network: with "net", bring `lo` up and write /etc/hosts.
        lock_mounts: with "mnt" and "user", lock the mounts so the container
            cannot unmount them to see what they cover (maps only the guest
            uid/gid in a nested user namespace).
        hostname: the host name in the container's "uts" namespace.
        env: None for an empty environment (Guix purifies it); else exactly
            this mapping.
        cwd: the working directory, a path inside the container.
        stdin: None to share the caller's, an fd, a file object, or
            subprocess.DEVNULL.
        stdout: as stdin.
        stderr: as stdin.
        child_is_pid1: with "pid", True (Guix's default) runs the target as
            PID 1, which only receives the signals it handles; False puts a
            small init there that relays SIGINT, SIGTERM, SIGHUP, SIGUSR1,
            SIGUSR2 and SIGQUIT to the target (PID 2), reaps orphans, and
            exits with the target's status (128+N for a signal).
        new_session: True (the default) makes the target call setsid(), as
            subprocess's start_new_session: in a session of its own it
            cannot reach the caller's terminal (TIOCSTI to push keystrokes
            into it, signals from its keyboard). A terminal on its stdin
            that is no session's yet (a pty made for it, as the CLI does)
            becomes its controlling terminal, with job control. False
            leaves it in the caller's session and process group.
        no_new_privs: True (the default) sets PR_SET_NO_NEW_PRIVS on the
            target: setuid bits and file capabilities of what it executes
            grant nothing.
        pass_fds: fds of the caller to give the container at the same
            numbers, as subprocess's pass_fds; no other fd but 0, 1 and 2
            is inherited.
        seccomp: the filter installed on the target: DEFAULT_SECCOMP (the
            kernel keyring, userfaultfd, kexec, modules, open_by_handle_at,
            perf_event_open, bpf ... fail with EPERM), a SeccompPolicy of
            your own, or None for no filter.
        capabilities: the capabilities the target keeps, by name
            ("CAP_NET_BIND_SERVICE" or "net_bind_service"); every other one
            is dropped from its bounding, permitted, effective, inheritable
            and ambient sets, so no exec brings it back. By default
            DEFAULT_CAPABILITIES (Podman's set: no CAP_SYS_ADMIN, CAP_NET_ADMIN,
            CAP_NET_RAW or CAP_SYS_PTRACE); ALL_CAPABILITIES or None keep
            everything root has in the container's user namespace. A name
            given here that the process does not hold (no "user" namespace,
            caller not root) fails the start with PermissionError.
        limits: cgroup limits, such as {"memory": "256M", "pids": 64,
            "cpu": 0.5}: "memory" in bytes or with K, M, G (the container's
            processes are OOM-killed beyond it, never swapped), "pids" the
            most tasks at once (fork fails with EAGAIN beyond it), "cpu" in
            CPUs (a quota per 100 ms period), "cpu_weight" from 1 to 10000
            (100 is an even share). Needs "pid" in namespaces. The container
            gets cgroups of its own (v2, or v1 per controller where v2 lacks
            it), removed when it exits, and with "cgroup" sees only its own
            tree. `Container.usage` then reports what it used; `{}` accounts
            without limiting.
        network: None (only loopback, with "net"), or "veth": a veth pair
            to the host on a private /30 (root only; needs "net" and
            pyroute2), with the container's default route through the
            host end; `Container.network` has the addresses. It is deleted
            when the container exits.

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
    config, request = _build(
        target,
        root=root,
        mounts=mounts,
        namespaces=namespaces,
        host_uids=host_uids,
        guest_uid=guest_uid,
        guest_gid=guest_gid,
        writable_root=writable_root,
        populate=populate,
        loopback_network=loopback_network,
        lock_mounts=lock_mounts,
        hostname=hostname,
        env=env,
        cwd=cwd,
        child_is_pid1=child_is_pid1,
        new_session=new_session,
        no_new_privs=no_new_privs,
        pass_fds=pass_fds,
        seccomp=seccomp,
        capabilities=capabilities,
        limits=limits,
        network=network,
    )
    stdio = _StdioFds()
    try:
        stdio.add("stdin", 0, stdin)
        stdio.add("stdout", 1, stdout)
        stdio.add("stderr", 2, stderr)
        return await _spawn(config, request, [*stdio.fds, *config.pass_fds])
    finally:
        stdio.close()


async def _spawn(config: ContainerConfig, request: SpawnRequest, stdio: list[int]) -> Container:
    container, handshake = await start_process(request, ContainerSetup(config), stdio)
    try:
        await await_ready(container, handshake)
    except BaseException:
        await container._kill_and_reap()
        raise
    finally:
        handshake.close()
    return container


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
    caller_status, server_status = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handshake = AsyncFrameChannel(caller_handshake)
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
            await handshake.send(setup, fds)
        except (BrokenPipeError, ConnectionResetError):
            # The child died before reading it; the status channel says why.
            pass
        message, pidfd = await receive_status(status)
        if isinstance(message, SpawnFailed):
            await _drain(status)
            raise rebuild_exception(message.error)
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
    container = Container(message.pid, pidfd, status)
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


async def await_ready(container: Container, handshake: AsyncFrameChannel) -> None:
    """Wait until the process reports that its target runs.

    Raises:
        The exception its set-up or exec raised (after reaping it), or
        ContainerError if it died without a word.
    """
    execing = False
    while True:
        root: list[int] = []
        reply = await next_reply(handshake, root)
        if root:
            # The container's root, sent with its ready reply (send_root).
            container._set_root(root.pop())
            for fd in root:
                os.close(fd)
        if reply is None:
            if execing:
                return
            returncode = await container.wait()
            raise ContainerError(
                f"the container process exited during its set-up with status {returncode} "
                "before reporting an error (killed from outside?)"
            )
        if isinstance(reply, Ready):
            return
        if isinstance(reply, Execing):
            execing = True
        elif isinstance(reply, SetupFailed):
            await container.wait()
            raise rebuild_exception(reply.error)
        else:
            raise ContainerError(f"unexpected message from the container: {reply!r}")


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
    *,
    mounts: Iterable[MountItem] = (),
    namespaces: Iterable[str] = NAMESPACES,
    host_uids: int = 1,
    **keywords: Any,
) -> int:
    """Run `target` in a new container, wait for it, and return its returncode.

    Takes every keyword of `run_container`. This is Guix's
    call-with-container, with a fresh tmpfs root instead of a temporary
    directory of the host.

    It raises what `run_container` raises.

    Cancellation: if cancelled (for example by `anyio.fail_after`), the
    container is killed and reaped before the cancellation propagates.
    """
    container = await run_container(
        target, mounts=mounts, namespaces=namespaces, host_uids=host_uids, **keywords
    )
    async with container:
        return await container.wait()
