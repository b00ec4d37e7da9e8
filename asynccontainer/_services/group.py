"""Services in containers: Shepherd's make-forkexec-constructor/container, structured.

A `ServiceSpec` says what to run and how; `ServiceGroup.start` runs it in a
container, waits until it is ready (its PID file names a live process, or
its container is set up), logs its output, respawns it if asked, and stops
it (SIGTERM, then SIGKILL after the grace period) when the group's block is
left in any way: normally, by an exception, or by a cancellation.
"""

from __future__ import annotations

import collections
import grp
import logging
import math
import os
import pwd
import resource
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import anyio
import attrs

from .. import _kernel
from .._core.container import (
    Container,
    _build,
    _spawn,
    _StdioFds,
)
from .._core.pidfile import PidTranslator, wait_for_pid_file
from .._errors import ContainerError
from .._plan import ServiceConfig
from .._spec.capabilities import DEFAULT_CAPABILITIES, capability_numbers
from .._spec.filesystems import (
    CONTAINER_FILE_SYSTEMS,
    HOST_SYSTEM_MAPPINGS,
    NETWORK_FILE_MAPPINGS,
    WRITABLE_TMP,
    FileSystem,
    FileSystemMapping,
    Symlink,
)
from .._spec.limits import ResourceUsage, check_limits, require_pid_namespace
from .._spec.namespaces import NAMESPACES, normalize_namespaces
from .._spec.network import VethNetwork, check_network
from .._spec.seccomp import DEFAULT_SECCOMP, SeccompPolicy

__all__ = [
    "Service",
    "ServiceGroup",
    "ServiceSpec",
    "UnknownAccountError",
    "default_mounts",
    "default_namespaces",
]

# Shepherd's respawn throttle: more than this many deaths ...
RESPAWN_LIMIT = 5
# ... within this many seconds disables the service.
RESPAWN_PERIOD = 7.0

_LOG_MODE = 0o640


def default_namespaces() -> frozenset[str]:
    """Return every namespace but "net" and "user", Shepherd's default for services.

    Most daemons are there to talk to the network, and most expect to run
    under a non-zero uid, which needs the host's ids.
    """
    return frozenset(NAMESPACES) - {"net", "user"}


def default_mounts(namespaces: Iterable[str] | None = None) -> list[FileSystem]:
    """Return Shepherd's default mounts for a service in `namespaces`.

    A tmpfs on /tmp; CONTAINER_FILE_SYSTEMS; the network files unless "net"
    is among the namespaces; /etc/passwd and /etc/group when "mnt" is and
    "user" is not (the service then shares the host's ids and must be able
    to look them up); /etc/localtime; and the host's program directories
    (HOST_SYSTEM_MAPPINGS, with links such as /bin -> usr/bin given as
    bind mounts of what they point to). Mappings whose source does not
    exist are dropped.

    Raises:
        ValueError, TypeError: for bad namespace names.
    """
    names = default_namespaces() if namespaces is None else normalize_namespaces(namespaces)
    mappings: list[FileSystemMapping] = []
    if "net" not in names:
        mappings.extend(NETWORK_FILE_MAPPINGS)
    if "mnt" in names and "user" not in names:
        mappings.extend((FileSystemMapping("/etc/passwd"), FileSystemMapping("/etc/group")))
    mappings.append(FileSystemMapping("/etc/localtime"))
    for item in HOST_SYSTEM_MAPPINGS:
        if isinstance(item, Symlink):
            mappings.append(FileSystemMapping(os.path.realpath(item.path), item.path))
        elif isinstance(item, FileSystemMapping):
            mappings.append(item)
    return [
        WRITABLE_TMP,
        *CONTAINER_FILE_SYSTEMS,
        *(m.to_bind_mount() for m in mappings if os.path.exists(m.source)),
    ]


class UnknownAccountError(KeyError, ValueError):
    """A user or group name that this host does not know.

    A KeyError, as pwd.getpwnam raises, and a ValueError, as every other
    bad argument; raised before anything is spawned.
    """

    def __str__(self) -> str:
        return str(self.args[0])


def _command(value: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    if isinstance(value, str | bytes):
        raise TypeError(
            f"a service command is a sequence of arguments, not the string {value!r}; "
            f"write [{value!r}], or ['sh', '-c', {value!r}]"
        )
    command = tuple(os.fspath(part) for part in value)
    if not command or not all(isinstance(part, str) for part in command):
        raise ValueError(f"a service command is a non-empty sequence of str, not {value!r}")
    return command


def _positive_seconds(name: str) -> Any:
    def check(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number of seconds, not {value!r}")
        if math.isnan(value) or value <= 0:
            raise ValueError(f"{name} must be more than zero seconds, not {value!r}")

    return check


def _grace(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"grace_period must be a number of seconds, not {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"grace_period must be zero or more seconds, not {value!r}")


def _optional_absolute(name: str) -> Any:
    def check(instance: object, attribute: attrs.Attribute[str | None], value: str | None) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str path, not {value!r}")
        if not value.startswith("/"):
            raise ValueError(f"{name} {value!r} is relative; give an absolute path")

    return check


def _optional_path(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def _mappings(items: Iterable[FileSystemMapping]) -> tuple[FileSystemMapping, ...]:
    result = tuple(items)
    for item in result:
        if not isinstance(item, FileSystemMapping):
            raise TypeError(f"mappings holds FileSystemMapping items, not {item!r}")
    return result


_RLIMIT_NAMES = {
    name[len("RLIMIT_") :].lower(): getattr(resource, name)
    for name in dir(resource)
    if name.startswith("RLIMIT_")
}


def _resource_limits(
    limits: Mapping[str, int | tuple[int, int]],
) -> tuple[tuple[str, int, int], ...]:
    result = []
    for name, value in dict(limits).items():
        key = str(name).lower().removeprefix("rlimit_")
        if key not in _RLIMIT_NAMES:
            raise ValueError(
                f"unknown resource limit {name!r}; choose among {', '.join(sorted(_RLIMIT_NAMES))}"
            )
        if isinstance(value, int) and not isinstance(value, bool):
            soft = hard = value
        elif (
            isinstance(value, tuple)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            soft, hard = value
        else:
            raise TypeError(f"resource limit {name!r} is an int or (soft, hard), not {value!r}")
        if soft > hard and hard != resource.RLIM_INFINITY:
            raise ValueError(f"resource limit {name!r}: soft {soft} is above hard {hard}")
        result.append((key, soft, hard))
    return tuple(result)


def _environment(
    env: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...] | None:
    return None if env is None else tuple(dict(env).items())


def _seccomp_policy(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, SeccompPolicy):
        raise TypeError(f"seccomp is a SeccompPolicy or None, not {value!r}")


def _capabilities(value: Iterable[str] | None) -> frozenset[str] | None:
    if value is None or value is DEFAULT_CAPABILITIES:
        return value
    # Read once: an iterator would be empty by the time frozenset() ran.
    names = value if isinstance(value, str) else tuple(value)
    capability_numbers(names)  # raises for bad names, before anything starts
    return frozenset(names)


def _limits(value: Mapping[str, object] | None) -> tuple[tuple[str, object], ...] | None:
    if value is None:
        return None
    check_limits(value)  # raises for bad limits, before anything starts
    return tuple(dict(value).items())


def _umask(instance: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"file_creation_mask must be an int from 0 to 0o777, not {value!r}")


def _account(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
        raise TypeError(f"{attribute.name} is a name or a numeric id, not {value!r}")


@attrs.frozen
class ServiceSpec:
    """What to run as a service, and how: Shepherd's make-forkexec-constructor/container.

    Every field is checked when the spec is made; names of users and groups
    are looked up when the service starts (before anything is spawned).

    Args:
        command: the program and its arguments (looked up on the service's
            PATH).
        name: for logs and the logger name; the program's base name by
            default.
        namespaces: default_namespaces() (all but "net" and "user").
        mappings: FileSystemMapping items added to default_mounts().
        user: user name or uid to run as (setuid), with its primary group
            unless `group` is given.
        group: group name or gid to run as (setgid).
        supplementary_groups: names or gids (setgroups); none by default.
        log_file: absolute host path; created if missing (0640, owned by
            `user`), mapped writable into the container; stdout and stderr
            lines go there, each prefixed "YYYY-MM-DD HH:MM:SS ". Without it,
            lines go to the logger "asynccontainer.service.NAME".
        pid_file: absolute path inside the container that the daemon writes
            its PID to; the service is started when it names a live process.
        pid_file_timeout: seconds to wait for the PID file.
        directory: working directory inside the container.
        environment: None for the caller's environment (as Shepherd), or
            exactly this mapping.
        resource_limits: {"nofile": 1024, "core": (0, 0), ...}: RLIMIT_*
            names (case and the prefix do not matter) to a limit or to
            (soft, hard).
        file_creation_mask: the umask, such as 0o027.
        grace_period: seconds between SIGTERM and SIGKILL when stopping.
        respawn: start the service again when it dies, unless it dies more
            than 5 times in 7 seconds.
        writable_root: the container's fresh tmpfs root stays writable (the
            default: daemons write to /var/run); it is private and goes
            with the container.
        no_new_privs: True (the default) sets PR_SET_NO_NEW_PRIVS on the
            service: setuid bits and file capabilities grant it nothing
            (the switch to `user` and `group` is done before, and is not
            affected).
        seccomp: the seccomp filter of the service: DEFAULT_SECCOMP, a
            SeccompPolicy of your own, or None.
        capabilities: the capabilities the service keeps, also after the
            switch to `user`: DEFAULT_CAPABILITIES, names of your own, or
            None for all (see `run_container`).
        limits: cgroup limits, as `run_container`'s ({"memory": "256M",
            "pids": 64, "cpu": 0.5, "cpu_weight": 100}); needs "pid" in
            namespaces. `Service.usage` reports what the last run used.
        network: None, or "veth" for a veth pair to the host (with "net"
            in namespaces; see `run_container`); `Service.network` has its
            addresses.

    Raises:
        TypeError, ValueError: naming the field and what to pass instead.
    """

    command: tuple[str, ...] = attrs.field(converter=_command)
    name: str = attrs.field(  # type: ignore[assignment]  # None becomes the program's name
        default=None,
        kw_only=True,
        validator=attrs.validators.optional(attrs.validators.instance_of(str)),
    )
    namespaces: frozenset[str] = attrs.field(
        factory=default_namespaces, kw_only=True, converter=normalize_namespaces
    )
    mappings: tuple[FileSystemMapping, ...] = attrs.field(
        default=(), kw_only=True, converter=_mappings
    )
    user: str | int | None = attrs.field(default=None, kw_only=True, validator=_account)
    group: str | int | None = attrs.field(default=None, kw_only=True, validator=_account)
    supplementary_groups: tuple[str | int, ...] = attrs.field(
        default=(), kw_only=True, converter=tuple
    )
    log_file: str | None = attrs.field(
        default=None,
        kw_only=True,
        converter=_optional_path,
        validator=_optional_absolute("log_file"),
    )
    pid_file: str | None = attrs.field(
        default=None,
        kw_only=True,
        converter=_optional_path,
        validator=_optional_absolute("pid_file"),
    )
    pid_file_timeout: float = attrs.field(
        default=5.0, kw_only=True, validator=_positive_seconds("pid_file_timeout")
    )
    directory: str = attrs.field(
        default="/", kw_only=True, converter=os.fspath, validator=_optional_absolute("directory")
    )
    environment: tuple[tuple[str, str], ...] | None = attrs.field(
        default=None, kw_only=True, converter=_environment
    )
    resource_limits: tuple[tuple[str, int, int], ...] = attrs.field(
        factory=dict, kw_only=True, converter=_resource_limits
    )
    file_creation_mask: int | None = attrs.field(default=None, kw_only=True, validator=_umask)
    grace_period: float = attrs.field(default=5.0, kw_only=True, validator=_grace)
    respawn: bool = attrs.field(
        default=False, kw_only=True, validator=attrs.validators.instance_of(bool)
    )
    writable_root: bool = attrs.field(
        default=True, kw_only=True, validator=attrs.validators.instance_of(bool)
    )
    no_new_privs: bool = attrs.field(
        default=True, kw_only=True, validator=attrs.validators.instance_of(bool)
    )
    seccomp: SeccompPolicy | None = attrs.field(
        default=DEFAULT_SECCOMP, kw_only=True, validator=_seccomp_policy
    )
    capabilities: frozenset[str] | None = attrs.field(
        default=DEFAULT_CAPABILITIES, kw_only=True, converter=_capabilities
    )
    limits: tuple[tuple[str, object], ...] | None = attrs.field(
        default=None, kw_only=True, converter=_limits
    )
    network: str | None = attrs.field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.name is None:
            object.__setattr__(self, "name", os.path.basename(self.command[0]))
        for group in self.supplementary_groups:
            _account(self, attrs.fields(ServiceSpec).supplementary_groups, group)
        if self.environment is not None:
            for key, value in self.environment:
                if not isinstance(key, str) or not isinstance(value, str) or "=" in key:
                    raise ValueError(f"environment variable {key!r}={value!r} is not valid")
        check_network(self.network, self.namespaces)
        if self.limits is not None:
            require_pid_namespace(self.namespaces)


def _lookup_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise UnknownAccountError(
            f"unknown user {user!r}: no such entry in this host's user database; "
            "create it, or pass a uid"
        ) from None


def _lookup_group(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UnknownAccountError(
            f"unknown group {group!r}: no such entry in this host's group database; "
            "create it, or pass a gid"
        ) from None


def _service_config(spec: ServiceSpec) -> ServiceConfig:
    """Resolve the spec's names into the numbers the container needs.

    Raises:
        UnknownAccountError: for a user or group this host does not know.
    """
    uid: int | None = None
    gid: int | None = None
    if isinstance(spec.user, str):
        entry = _lookup_user(spec.user)
        uid, gid = entry.pw_uid, entry.pw_gid
    elif isinstance(spec.user, int):
        uid, gid = _uid_only(spec.user)
    if spec.group is not None:
        gid = _lookup_group(spec.group)
    groups: tuple[int, ...] | None = None
    if spec.supplementary_groups or spec.user is not None:
        # With a user, drop root's supplementary groups (Shepherd sets them
        # to exactly the given list).
        groups = tuple(_lookup_group(g) for g in spec.supplementary_groups)
    return ServiceConfig(
        pid_file=spec.pid_file,
        uid=uid,
        gid=gid,
        groups=groups,
        umask=spec.file_creation_mask,
        rlimits=tuple(
            (_RLIMIT_NAMES[name], soft, hard) for name, soft, hard in spec.resource_limits
        ),
        directory=spec.directory,
        init="pid" in spec.namespaces,
    )


def _uid_only(uid: int) -> tuple[int, int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # A uid without an account keeps the gid it is given, or its own number.
        return uid, uid
    return entry.pw_uid, entry.pw_gid


def _prepare_log_file(path: str, config: ServiceConfig) -> None:
    """Create the log file (and its directory) if missing: mode 0640, owned by the user.

    Raises:
        OSError: when the directory cannot be created or the file opened,
            naming the path.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, _LOG_MODE)
    try:
        if os.fstat(fd).st_size == 0:
            os.fchmod(fd, _LOG_MODE)
        if config.uid is not None:
            os.fchown(fd, config.uid, config.gid if config.gid is not None else -1)
    finally:
        os.close(fd)


class _LineLogger:
    """Reads a service's output pipe and writes timestamped lines."""

    def __init__(self, read_fd: int, log_file: str | None, name: str) -> None:
        os.set_blocking(read_fd, False)
        self.read_fd = read_fd
        self.log_fd = (
            os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if log_file is not None
            else None
        )
        self.logger = logging.getLogger(f"asynccontainer.service.{name}")
        self.done = anyio.Event()

    def close(self) -> None:
        """Close both fds and mark the logger done (at its end, or if it never runs)."""
        os.close(self.read_fd)
        if self.log_fd is not None:
            os.close(self.log_fd)
        self.done.set()

    def emit(self, line: bytes) -> None:
        # Bytes that are not UTF-8 are replaced, never a reason to stop.
        text = line.decode("utf-8", errors="replace")
        if self.log_fd is None:
            self.logger.info("%s", text)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
            # One write(2) per line on an O_APPEND fd: lines stay whole
            # next to what the daemon itself writes to the same file.
            os.write(self.log_fd, (stamp + text + "\n").encode())

    async def run(self) -> None:
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(self.read_fd, 65536)
                except BlockingIOError:
                    await anyio.wait_readable(self.read_fd)
                    continue
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.emit(line)
            if pending:
                self.emit(pending)
        finally:
            self.close()


class Service:
    """A service started by `ServiceGroup.start`: its process, state and history."""

    def __init__(self, spec: ServiceSpec, group: ServiceGroup) -> None:
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
        self.restarts = 0
        """How many times the service was respawned."""
        self.disabled = False
        """True once respawning was given up (it died too often)."""

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

    async def wait(self) -> int:
        """Wait until the service is down for good (stopped, or dead and not respawned).

        Returns:
            Its last exit status (with a pid namespace, the status of its
            last process, 128+N for a signal, as the init reports it).
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
        with anyio.CancelScope(shield=True):
            if not self._finished.is_set():
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
        self._finished.set()

    async def _launch(self) -> None:
        """Start a container for the spec and wait until the service is ready.

        Cancellation or failure: whatever was started is stopped first.
        """
        spec = self.spec
        config = _service_config(spec)
        if spec.log_file is not None:
            _prepare_log_file(spec.log_file, config)
        mounts: list[Any] = [*default_mounts(spec.namespaces)]
        mounts.extend(m.to_bind_mount() for m in spec.mappings)
        if spec.log_file is not None and "mnt" in spec.namespaces:
            mounts.append(FileSystemMapping(spec.log_file, writable=True).to_bind_mount())
        env = dict(os.environ) if spec.environment is None else dict(spec.environment)
        container_config, request = _build(
            list(spec.command),
            root=None,
            mounts=mounts,
            namespaces=spec.namespaces,
            host_uids=1,
            guest_uid=0,
            guest_gid=0,
            writable_root=spec.writable_root,
            populate=None,
            loopback_network=True,
            lock_mounts=True,
            hostname=None,
            env=env,
            cwd="/",
            no_new_privs=spec.no_new_privs,
            seccomp=spec.seccomp,
            capabilities=spec.capabilities,
            limits=None if spec.limits is None else dict(spec.limits),
            network=spec.network,
        )
        container_config = attrs.evolve(
            container_config,
            service=config,
            # A daemon's PID file is read in its mount namespace, through
            # the container's root, which the first process may not outlive.
            send_root=spec.pid_file is not None and "mnt" in spec.namespaces,
        )

        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            logger = _LineLogger(read_fd, spec.log_file, spec.name)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        stdio = _StdioFds()
        try:
            stdio.add("stdin", 0, subprocess.DEVNULL)
            stdio.add("stdout", 1, write_fd)
            stdio.add("stderr", 2, write_fd)
            container = await _spawn(container_config, request, stdio.fds)
        except BaseException:
            logger.close()
            raise
        finally:
            stdio.close()
            os.close(write_fd)
        self._group._run(logger.run, f"log of {spec.name}", logger.done)
        self._container = container
        # The service keeps the root: the container closes its own copy when
        # its first process exits, which a forking daemon's parent does.
        self._set_root(container._root_fd)
        container._root_fd = None
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
                outcome.append(
                    ContainerError(
                        f"service {spec.name!r} exited with status {self._returncode} "
                        f"before its PID file {spec.pid_file} named a live process"
                    )
                )
                race.cancel_scope.cancel()

            race.start_soon(reader)
            race.start_soon(died)
        first = outcome[0]
        if isinstance(first, BaseException):
            raise first
        return first

    async def _watch(self) -> None:
        """Set `_ended` once every process of the current launch is gone."""
        container = self._container
        assert container is not None
        ended = self._ended
        self._returncode = await container.wait()
        if "pid" not in self.spec.namespaces:
            # Without a pid namespace, a daemon outlives its container's
            # first process: follow it too, through its pidfd, which turns
            # readable when it exits (pidfd_open(2)).
            await self._settled.wait()
            if self._pidfd is not None and self._pid != container.pid:
                await anyio.wait_readable(self._pidfd)
        ended.set()

    async def _terminate(self) -> None:
        """SIGTERM every process of the service, SIGKILL after the grace period, wait."""
        if self._container is None:
            return
        self._signal_all(signal.SIGTERM)
        with anyio.move_on_after(self.spec.grace_period):
            await self._ended.wait()
            return
        self._signal_all(signal.SIGKILL)
        await self._ended.wait()

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
                if not self.spec.respawn:
                    self._finish()
                    return
                if self._throttled():
                    self.disabled = True
                    logger.error(
                        "service %r died more than %d times in %.0f seconds: respawning disabled",
                        self.name,
                        RESPAWN_LIMIT,
                        RESPAWN_PERIOD,
                    )
                    self._finish()
                    return
                logger.warning(
                    "service %r exited with status %s; respawning", self.name, self._returncode
                )
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
                try:
                    await self._launch()
                except Exception as exc:
                    # A failed start counts as a death, so the throttle ends this.
                    logger.error("respawning service %r failed: %s", self.name, exc)
                    continue
                self.restarts += 1

    def _throttled(self) -> bool:
        """Record a death; return True if there were too many lately (Shepherd's rule)."""
        now = time.monotonic()
        self._deaths.append(now)
        while now - self._deaths[0] > RESPAWN_PERIOD:
            self._deaths.popleft()
        return len(self._deaths) > RESPAWN_LIMIT


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
        return None

    async def start(self, spec: ServiceSpec) -> Service:
        """Start a service and return it once it is ready.

        Ready means: with `pid_file`, the file names a live process (whose
        host PID becomes `service.pid`); otherwise the container is set up
        and the command exec'd.

        Raises:
            TimeoutError: the PID file did not name a live process within
                `pid_file_timeout`; every process of the service was killed.
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
        service = Service(spec, self)
        await service._launch()
        self._services.append(service)
        self._run(service._supervise, f"supervisor of {spec.name}", None)
        return service
