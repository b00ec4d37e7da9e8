"""ServiceSpec: what to run as a service, and how (Shepherd's make-forkexec-constructor/container).

A `ServiceSpec` holds every container option (`SharedOptions`, defined once
in `_spec.container`) plus what makes a service: its command, accounts, log
file, PID file, stop and respawn behaviour. `container_spec` turns it into
the `ContainerSpec` its container is started with.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import signal
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .._forkserver.init import RELAYED_SIGNALS
from .._plan import steps
from .._plan.build import Extras
from .._spec.checks import (
    MAX_ID,
    absolute_path,
    boolean,
    environment,
    hint_unknown_keywords,
    seconds,
)
from .._spec.container import ContainerSpec, SharedOptions, check_rules
from .._spec.filesystems import (
    CONTAINER_FILE_SYSTEMS,
    HOST_SYSTEM_MAPPINGS,
    NETWORK_FILE_MAPPINGS,
    WRITABLE_TMP,
    FileSystem,
    FileSystemMapping,
    MountItem,
    Symlink,
)
from .._spec.namespaces import NAMESPACES, normalize_namespaces
from .endpoint import Endpoint

__all__ = [
    "DIRECTORY_BASES",
    "RUN",
    "ServiceSpec",
    "UnknownAccountError",
    "default_mounts",
    "default_namespaces",
    "service_extras",
]


RUN = FileSystem(
    "none", "/run", "tmpfs", flags=frozenset({"no-suid", "no-dev"}), options="mode=0755"
)
"""A service's own writable /run (a tmpfs), /var/run a link to it."""

# The *_directories fields and their bases, on the host and inside (systemd.exec(5),
# "RuntimeDirectory=, StateDirectory=, CacheDirectory=, LogsDirectory=").
DIRECTORY_BASES = {
    "runtime_directories": "/run",
    "state_directories": "/var/lib",
    "cache_directories": "/var/cache",
    "logs_directories": "/var/log",
}


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


def _log_file(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else absolute_path("log_file", value)


def _pid_file(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else absolute_path("pid_file", value)


def _directory(value: str | os.PathLike[str]) -> str:
    return absolute_path("directory", value)


def _environment(
    value: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...] | None:
    return environment("environment", value)


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


def _resource_limit(name: object, value: object) -> tuple[str, int, int]:
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
    return key, soft, hard


def _resource_limits(
    limits: Mapping[str, int | tuple[int, int]] | Iterable[tuple[str, int, int]],
) -> tuple[tuple[str, int, int], ...]:
    if isinstance(limits, Mapping):
        return tuple(_resource_limit(name, value) for name, value in limits.items())
    # Already checked triples, as attrs.evolve passes them back.
    return tuple(_resource_limit(name, (soft, hard)) for name, soft, hard in limits)


def _umask(instance: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"file_creation_mask must be an int from 0 to 0o777, not {value!r}")


def _account(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"{attribute.name} is a name or a numeric id, not {value!r}")
    if isinstance(value, int) and not 0 <= value <= MAX_ID:
        raise ValueError(f"{attribute.name} {value} is not an id: give 0 to {MAX_ID}")
    if isinstance(value, str) and (not value or "\0" in value or ":" in value):
        raise ValueError(f"{attribute.name} {value!r} is not a user or group name")


def _groups(value: Iterable[str | int]) -> tuple[str | int, ...]:
    if isinstance(value, str | bytes | int):
        raise TypeError(
            f"supplementary_groups is a sequence of names or ids, not {value!r}; write [{value!r}]"
        )
    return tuple(value)


def _accounts(instance: object, attribute: attrs.Attribute[Any], value: tuple[object, ...]) -> None:
    for account in value:
        _account(instance, attribute, account)


def _directory_names(field: str, value: Iterable[str]) -> tuple[str, ...]:
    """Check a `*_directories` field: relative names, as systemd takes them."""
    if isinstance(value, str | bytes):
        raise TypeError(f"{field} is a sequence of names, not {value!r}; write [{value!r}]")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{field} holds directory names (str), not {name!r}")
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or "\0" in name
            or any(part in ("", ".", "..") for part in parts)
        ):
            raise ValueError(
                f"{field}: {name!r} is not a relative directory name such as 'nginx' or "
                "'nginx/body' (no leading /, no . or .. parts)"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"{field} names a directory twice: {names!r}")
    return names


def _requires(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str | bytes):
        raise TypeError(
            f"requires is a sequence of service names, not {value!r}; write [{value!r}]"
        )
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"requires holds service names (non-empty str), not {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"requires names a service twice: {list(names)!r}")
    return names


def _sockets(value: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    if isinstance(value, Endpoint):
        raise TypeError(f"sockets is a sequence of Endpoint; write [{value!r}]")
    endpoints = tuple(value)
    for endpoint in endpoints:
        if not isinstance(endpoint, Endpoint):
            raise TypeError(
                f"sockets holds ac.Endpoint items, as Endpoint(('127.0.0.1', 8080)), "
                f"not {endpoint!r}"
            )
    if len(set(endpoints)) != len(endpoints):
        raise ValueError("sockets names an endpoint twice")
    return endpoints


def _max_connections(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_connections is a whole number from 1, not {value!r}")


# sd_listen_fds(3)'s variables.
_LISTEN_VARIABLES = ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")


def _runtime_directories(value: Iterable[str]) -> tuple[str, ...]:
    return _directory_names("runtime_directories", value)


def _state_directories(value: Iterable[str]) -> tuple[str, ...]:
    return _directory_names("state_directories", value)


def _cache_directories(value: Iterable[str]) -> tuple[str, ...]:
    return _directory_names("cache_directories", value)


def _logs_directories(value: Iterable[str]) -> tuple[str, ...]:
    return _directory_names("logs_directories", value)


def _signal_number(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} is a signal number (signal.SIGTERM ...), not {value!r}")
    if value not in set(signal.valid_signals()) or value in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{attribute.name} {value} is not a signal a service can handle")


def _signal(value: int | str) -> int:
    # "SIGQUIT" or "QUIT" (the services file's spelling) is the signal of that name.
    if isinstance(value, str):
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise ValueError(f"{value!r} is not the name of a signal") from None
    return value if isinstance(value, bool) or not isinstance(value, int) else int(value)


def _log_size(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
        raise ValueError(f"log_max_bytes must be a whole number of bytes from 1024, not {value!r}")


def _log_keep(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ValueError(
            f"log_keep must be how many rotated files to keep, 1 to 1000, not {value!r}"
        )


def _respawn_limit(value: tuple[int, float]) -> tuple[int, float]:
    try:
        starts, period = value
    except (TypeError, ValueError):
        raise TypeError(f"respawn_limit is (starts, seconds), as (5, 7.0), not {value!r}") from None
    if isinstance(starts, bool) or not isinstance(starts, int) or starts < 1:
        raise ValueError(f"respawn_limit's starts must be a whole number from 1, not {starts!r}")
    if isinstance(period, bool) or not isinstance(period, int | float) or not period > 0:
        raise ValueError(f"respawn_limit's period must be seconds above 0, not {period!r}")
    return starts, float(period)


# A container's spelling of a service option, for the hint of a TypeError.
_CONTAINER_SPELLINGS = {"mounts": "mappings", "env": "environment", "cwd": "directory"}


@hint_unknown_keywords("service", _CONTAINER_SPELLINGS)
@attrs.frozen
class ServiceSpec(SharedOptions):
    """What to run as a service, and how: Shepherd's make-forkexec-constructor/container.

    Every field is checked when the spec is made; names of users and groups
    are looked up when the service starts (before anything is spawned).
    Every container option of `ContainerSpec` is accepted too (root,
    hostname, limits, capabilities, seccomp, pass_fds, populate ...), with
    the same meaning, except that `namespaces` and `writable_root` have
    other defaults; what `ContainerSpec` calls `mounts`, `env` and `cwd` are
    `mappings` (added to `default_mounts`), `environment` and `directory`
    here. A service always has a session of its own (it is stopped through
    it), and with a pid namespace always an init as PID 1, which outlives
    a daemon's forking parent.

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
            its PID to; the service is started when it names a live process,
            which is then its main process. The main process is otherwise
            the one MAINPID= names (notify), or the command's; its exit
            ends the service (systemd's rule): what is left gets the stop
            signal, then SIGKILL after `grace_period`.
        start_timeout: seconds a PID file or READY=1 may take (5); past
            them every process of the service is killed and a TimeoutError
            raised.
        pid_file_timeout: another name for start_timeout.
        notify: speak sd_notify(3): $NOTIFY_SOCKET is set and reachable
            inside, READY=1 marks the service started, MAINPID=N (in its
            pid namespace, which it needs) names its main process,
            STATUS= is `Service.status_text`, RELOADING=1 and STOPPING=1
            set its state. Datagrams of other processes are ignored.
        directory: working directory inside the container.
        environment: None for the caller's environment (as Shepherd), or
            exactly this mapping.
        resource_limits: {"nofile": 1024, "core": (0, 0), ...}: RLIMIT_*
            names (case and the prefix do not matter) to a limit or to
            (soft, hard).
        file_creation_mask: the umask, such as 0o027.
        grace_period: seconds between the stop signal and SIGKILL when
            stopping.
        respawn: start the service again when it dies, unless it dies more
            often than `respawn_limit` says.
        writable_root: the container's root stays writable (the default);
            a fresh tmpfs root is private and goes with the container.
            Either way the service gets a writable /run of its own (a
            tmpfs), and in a fresh root /var/run is a link to it.
        runtime_directories: relative names, as systemd's
            RuntimeDirectory=: each is made on the host under /run if
            missing (the innermost owned by `user` and `group`, mode
            0755), mapped writable at the same path, and removed when the
            service stops. Nothing is made through a link.
        state_directories: the same under /var/lib (StateDirectory=),
            kept after the stop.
        cache_directories: the same under /var/cache (CacheDirectory=).
        logs_directories: the same under /var/log (LogsDirectory=).
        stop_signal: the signal that stops it (a number or a name such as
            "SIGQUIT"; SIGTERM by default), SIGKILL following after
            `grace_period`. With a pid namespace, one its init passes on:
            SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2 or SIGQUIT.
        reload_signal: what `Service.reload` sends (SIGHUP), the same rule.
        respawn_delay: seconds before a respawn (0.1, Shepherd 0.10.3's).
        respawn_limit: (starts, seconds): more starts than this within the
            period disable respawning ((5, 7.0), Shepherd's).
        log_max_bytes: rotate `log_file` once it holds this many bytes
            (from 1024), as Shepherd 1.0's log rotation: the file becomes
            FILE.1, FILE.1 becomes FILE.2 ..., between two lines, so no
            line is split or lost. None (the default) never rotates.
        log_keep: how many rotated files are kept (5).
        sockets: `Endpoint` items the caller listens on (systemd's socket
            units): the service gets them as fds 3, 4 ... with LISTEN_FDS,
            LISTEN_FDNAMES and LISTEN_PID (its PID in its pid namespace).
            Bound before anything starts; closed when the service stops.
        lazy_start: start the service on the first connection to one of
            its sockets (the connection waits in the backlog); after it
            dies, on the next one.
        accept: inetd style (systemd's Accept=yes): a fresh container per
            connection, the connection as its stdin and stdout (stderr to
            the log), at most `max_connections` (64) at once; further
            connections wait in the backlog.
        max_connections: see `accept`.
        requires: names of services that must be started before this one
            (systemd's Requires= with After=): `ServiceGroup.start_all`
            starts them first, `ServiceGroup.start` wants them running in
            the group, and the group stops this one before them.

    The other keywords are `ContainerSpec`'s: root, host_uids, guest_uid,
    guest_gid, populate, loopback_network, lock_mounts, hostname,
    no_new_privs, pass_fds, seccomp, capabilities (with `user`, none of the
    default set is kept: name those the service needs, and they are kept
    across the switch), limits (`Service.usage` reports what the last run
    used) and network (`Service.network` has the veth pair's addresses).

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
        default=(), kw_only=True, converter=_groups, validator=_accounts
    )
    log_file: str | None = attrs.field(default=None, kw_only=True, converter=_log_file)
    pid_file: str | None = attrs.field(default=None, kw_only=True, converter=_pid_file)
    # Two names for one number (pid_file_timeout came first): either may be
    # given, and both read the same once the spec is made.
    start_timeout: float = attrs.field(  # type: ignore[assignment]  # None becomes 5.0
        default=None,
        kw_only=True,
        validator=attrs.validators.optional(seconds(zero_allowed=False)),
    )
    pid_file_timeout: float = attrs.field(  # type: ignore[assignment]  # None: start_timeout
        default=None,
        kw_only=True,
        validator=attrs.validators.optional(seconds(zero_allowed=False)),
    )
    notify: bool = attrs.field(default=False, kw_only=True, validator=boolean)
    directory: str = attrs.field(default="/", kw_only=True, converter=_directory)
    environment: tuple[tuple[str, str], ...] | None = attrs.field(
        default=None, kw_only=True, converter=_environment
    )
    resource_limits: tuple[tuple[str, int, int], ...] = attrs.field(
        factory=dict, kw_only=True, converter=_resource_limits
    )
    file_creation_mask: int | None = attrs.field(default=None, kw_only=True, validator=_umask)
    grace_period: float = attrs.field(
        default=5.0, kw_only=True, validator=seconds(zero_allowed=True)
    )
    respawn: bool = attrs.field(default=False, kw_only=True, validator=boolean)
    writable_root: bool = attrs.field(default=True, kw_only=True, validator=boolean)
    runtime_directories: tuple[str, ...] = attrs.field(
        default=(), kw_only=True, converter=_runtime_directories
    )
    state_directories: tuple[str, ...] = attrs.field(
        default=(), kw_only=True, converter=_state_directories
    )
    cache_directories: tuple[str, ...] = attrs.field(
        default=(), kw_only=True, converter=_cache_directories
    )
    logs_directories: tuple[str, ...] = attrs.field(
        default=(), kw_only=True, converter=_logs_directories
    )
    stop_signal: int = attrs.field(
        default=int(signal.SIGTERM), kw_only=True, converter=_signal, validator=_signal_number
    )
    reload_signal: int = attrs.field(
        default=int(signal.SIGHUP), kw_only=True, converter=_signal, validator=_signal_number
    )
    respawn_delay: float = attrs.field(
        default=0.1, kw_only=True, validator=seconds(zero_allowed=True)
    )
    respawn_limit: tuple[int, float] = attrs.field(
        default=(5, 7.0), kw_only=True, converter=_respawn_limit
    )
    log_max_bytes: int | None = attrs.field(
        default=None, kw_only=True, validator=attrs.validators.optional(_log_size)
    )
    log_keep: int = attrs.field(default=5, kw_only=True, validator=_log_keep)
    requires: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=_requires)
    sockets: tuple[Endpoint, ...] = attrs.field(default=(), kw_only=True, converter=_sockets)
    lazy_start: bool = attrs.field(default=False, kw_only=True, validator=boolean)
    accept: bool = attrs.field(default=False, kw_only=True, validator=boolean)
    max_connections: int = attrs.field(default=64, kw_only=True, validator=_max_connections)

    def __attrs_post_init__(self) -> None:
        if self.name is None:
            object.__setattr__(self, "name", os.path.basename(self.command[0]))
        self._resolve_start_timeout()
        self._check_notify_and_log()
        if self.name in self.requires:
            raise ValueError(f"service {self.name!r} requires itself; drop it from requires")
        self._check_sockets()
        if "pid" in self.namespaces:
            for field in ("stop_signal", "reload_signal"):
                number = getattr(self, field)
                if number not in RELAYED_SIGNALS:
                    names = ", ".join(signal.Signals(n).name for n in RELAYED_SIGNALS)
                    raise ValueError(
                        f"{field} {signal.Signals(number).name} is not one the init of a pid "
                        f"namespace passes on ({names}); drop 'pid' from namespaces to use it"
                    )
        check_rules(
            self,
            needing_mnt=(
                ("root", self.root),
                ("mappings", self.mappings),
                ("populate", self.populate),
                *((field, getattr(self, field)) for field in DIRECTORY_BASES),
            ),
        )

    def _check_sockets(self) -> None:
        if (self.lazy_start or self.accept) and not self.sockets:
            which = "lazy_start" if self.lazy_start else "accept"
            raise ValueError(f"{which} starts the service on a connection: give it sockets too")
        if self.accept:
            for field in ("lazy_start", "respawn", "notify", "pid_file"):
                if getattr(self, field):
                    raise ValueError(
                        f"accept=True starts a container per connection, which {field} does "
                        f"not apply to; drop {field}"
                    )
            return
        taken = set(range(3, 3 + len(self.sockets))) & set(self.pass_fds)
        if taken:
            raise ValueError(
                f"pass_fds {sorted(taken)} are where the sockets go (3 ...): pass those fds "
                f"from {3 + len(self.sockets)} up"
            )

    def _resolve_start_timeout(self) -> None:
        start, pid_file = self.start_timeout, self.pid_file_timeout
        if start is not None and pid_file is not None and start != pid_file:
            raise ValueError(
                f"start_timeout {start!r} and pid_file_timeout {pid_file!r} are two names "
                "for one number: give only start_timeout"
            )
        value = next((v for v in (start, pid_file) if v is not None), 5.0)
        object.__setattr__(self, "start_timeout", value)
        object.__setattr__(self, "pid_file_timeout", value)

    def _check_notify_and_log(self) -> None:
        if self.notify and self.pid_file is not None:
            raise ValueError(
                "notify=True and pid_file: readiness is READY=1, and MAINPID= names the main "
                "process; drop pid_file"
            )
        if self.notify and "pid" not in self.namespaces:
            # Without one, nothing tells the service's processes from the
            # host's: a datagram's sender (and MAINPID=) could be any process.
            raise ValueError(
                "notify=True needs a pid namespace, so that only the service's own processes "
                "are heard: keep 'pid' in namespaces"
            )
        if self.log_max_bytes is not None and self.log_file is None:
            raise ValueError("log_max_bytes rotates the log_file: give a log_file too")

    def container_spec(
        self, environ: Mapping[str, str] | None = None, *, notify_socket: str | None = None
    ) -> ContainerSpec:
        """Return the spec of the service's container.

        Its mounts are `default_mounts(namespaces)` and the mappings, when
        the service has a mount namespace (the log file is added by
        `service_extras`, refused if it is a link); its
        environment is `environment`, or `environ` (the caller's, by
        default) when that is None.
        """
        mounts: list[MountItem] = []
        if "mnt" in self.namespaces:
            mounts.extend(default_mounts(self.namespaces))
            # A writable /run of its own (daemons write their PID files and
            # sockets there), /var/run a link to it in a fresh root.
            mounts.append(RUN)
            if self.root is None:
                # Relative, as a path through /proc/PID/root from the host resolves it too.
                mounts.append(Symlink("/var/run", "../run"))
            mounts.extend(self.mappings)
            mounts.extend(
                FileSystemMapping(f"{base}/{name}", writable=True)
                for field, base in DIRECTORY_BASES.items()
                for name in getattr(self, field)
            )
        env = self.environment
        if env is None:
            env = tuple((os.environ if environ is None else environ).items())
        # The caller's own activation (it may have been started by systemd)
        # is not the service's.
        env = tuple((k, v) for k, v in env if k not in _LISTEN_VARIABLES)
        if self.sockets and not self.accept:
            names = [endpoint.name or self.name for endpoint in self.sockets]
            env = (*env, ("LISTEN_FDS", str(len(names))), ("LISTEN_FDNAMES", ":".join(names)))
        if notify_socket is not None:
            # sd_notify(3): the socket is mapped at its host path (service_extras).
            env = (
                *((k, v) for k, v in env if k != "NOTIFY_SOCKET"),
                ("NOTIFY_SOCKET", notify_socket),
            )
        shared = {field.name: getattr(self, field.name) for field in attrs.fields(SharedOptions)}
        return ContainerSpec(**shared, mounts=mounts, env=env, cwd=self.directory, new_session=True)


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


def _uid_only(uid: int) -> tuple[int, int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # A uid without an account keeps the gid it is given, or its own number.
        return uid, uid
    return entry.pw_uid, entry.pw_gid


def service_extras(spec: ServiceSpec, notify_socket: str | None = None) -> Extras:
    """Return what the service adds to its container's plan, names resolved to numbers.

    Shepherd's steps: after the container is set up, /var/run is made and
    a stale PID file removed (before the root turns read-only); before
    exec, setrlimit, setgroups, setgid, setuid and umask. With a pid
    namespace, an init that stays while any process is left.

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
    # A fresh root has /var/run as a link to /run (container_spec); a given
    # root keeps its own, made if missing.
    prepare: list[steps.Step] = [] if spec.root is None else [steps.MakeDirectory("/var/run")]
    if spec.pid_file is not None:
        prepare.append(steps.RemovePath(spec.pid_file))
    return Extras(
        uid=uid,
        gid=gid,
        groups=groups,
        umask=spec.file_creation_mask,
        rlimits=tuple(
            (_RLIMIT_NAMES[name], soft, hard) for name, soft, hard in spec.resource_limits
        ),
        init_for_all=True,
        prepare=tuple(prepare),
        # A daemon's PID file is read in its mount namespace, through the
        # container's root, which the first process may not outlive.
        send_root=spec.pid_file is not None and "mnt" in spec.namespaces,
        listen_fds=0 if spec.accept else len(spec.sockets),
        writable_files=tuple(
            path
            for path in (spec.log_file, notify_socket)
            if path is not None and "mnt" in spec.namespaces
        ),
    )
