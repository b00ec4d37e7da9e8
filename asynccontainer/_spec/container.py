"""ContainerSpec: every option of a container, defined and checked once.

`run_container`, `call_with_container`, the CLI and (through
`ContainerOptions`, the part services share) `ServiceSpec` and the
services file all take their options from the classes here. A spec is a
frozen value: each field is checked by its own converter or validator when
the spec is made, and the rules that tie fields together are checked right
after, in `check_rules`. What depends on the machine rather than on the
values (does `root` exist, is the caller root, can cgroups be made) is
checked when a plan is made from the spec, just before anything is spawned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypedDict

import attrs

from .._kernel import SCM_MAX_FD
from .capabilities import DEFAULT_CAPABILITIES, capability_name, capability_numbers
from .checks import (
    MAX_ID,
    absolute_path,
    boolean,
    environment,
    hint_unknown_keywords,
    identifier,
    unknown_keyword,
)
from .filesystems import FileSystem, FileSystemMapping, MountItem, Symlink
from .limits import CgroupLimits, check_limits
from .namespaces import NAMESPACES, normalize_namespaces
from .network import NETWORK_MODES
from .seccomp import DEFAULT_SECCOMP, SeccompPolicy

__all__ = [
    "ContainerOptions",
    "ContainerSpec",
    "SharedOptions",
    "check_rules",
    "resolve_spec",
]

# sethostname(2): HOST_NAME_MAX.
_HOST_NAME_MAX = 64


def _root(value: str | os.PathLike[str] | None) -> str | None:
    if value is None:
        return None
    text = os.fspath(value)
    if isinstance(text, str) and not text.startswith("/"):
        # A relative root ("" or "." among them) would be resolved against
        # whatever the working directory is, and filled with mount points.
        raise ValueError(
            f"root {text!r} is relative; give the absolute path of a host directory, "
            f"such as {os.path.abspath(text)!r}"
        )
    return absolute_path("root", text)


def _cwd(value: str | os.PathLike[str]) -> str:
    return absolute_path("cwd", value)


def _env(
    value: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...] | None:
    return environment("env", value)


def _host_uids(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"host_uids must be an int, not {value!r}")
    if value < 1:
        raise ValueError(f"host_uids must be 1 or more, not {value}")


def _optional_callable(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{attribute.name} must be a callable taking no arguments, not {value!r}")


def _hostname(instance: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"hostname must be a str, not {value!r}")
    if not value or len(value.encode()) > _HOST_NAME_MAX or "\0" in value:
        raise ValueError(f"hostname {value!r} must be 1 to {_HOST_NAME_MAX} bytes without NUL")


def _pass_fds(value: Iterable[int]) -> tuple[int, ...]:
    if isinstance(value, int):
        raise TypeError("pass_fds is a sequence of fds; wrap a single one as (fd,)")
    fds = tuple(value)
    for fd in fds:
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError(f"pass_fds holds fd numbers, not {fd!r}")
        if fd < 3:
            raise ValueError(f"pass_fds: {fd} is stdio; give it as stdin, stdout or stderr")
    if len(set(fds)) != len(fds):
        raise ValueError(f"pass_fds {fds} names an fd twice")
    if len(fds) > SCM_MAX_FD - 3:
        raise ValueError(f"pass_fds: at most {SCM_MAX_FD - 3} fds may be passed")
    return fds


def _seccomp(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, SeccompPolicy):
        raise TypeError(f"seccomp is a SeccompPolicy or None, not {value!r}")


def _capabilities(value: Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    # Read once (an iterator would be empty the second time), and kept by
    # canonical name, so that {"net_bind_service"} equals {"CAP_NET_BIND_SERVICE"}.
    names = value if isinstance(value, str) else tuple(value)
    return frozenset(capability_name(number) for number in capability_numbers(names))


def _limits(value: Mapping[str, object] | CgroupLimits | None) -> CgroupLimits | None:
    if value is None or isinstance(value, CgroupLimits):
        return value
    return check_limits(value)


def _network(instance: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"network is None or 'veth', not {value!r}")
    if value not in NETWORK_MODES:
        raise ValueError(f"network {value!r} is not supported; give None or 'veth'")


def _mount_items(value: Iterable[MountItem]) -> tuple[MountItem, ...]:
    if isinstance(value, FileSystem | FileSystemMapping | Symlink):
        raise TypeError("mounts is a sequence of mount items; wrap a single one as (item,)")
    if isinstance(value, str | bytes):
        raise TypeError(f"mounts is a sequence of mount items, not the string {value!r}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, FileSystem | FileSystemMapping | Symlink):
            raise TypeError(
                f"mounts holds FileSystem, FileSystemMapping or Symlink items, not {item!r}"
            )
    return items


@attrs.frozen(kw_only=True)
class SharedOptions:
    """The container options that services share with `run_container` (see ContainerSpec).

    `ServiceSpec` derives from this class, with other defaults for
    `namespaces` and `writable_root`; `ContainerSpec` adds what a service
    names otherwise (`mounts`, `env`, `cwd`) or always does (an init, a
    session of its own).
    """

    root: str | None = attrs.field(default=None, converter=_root)
    namespaces: frozenset[str] = attrs.field(
        default=frozenset(NAMESPACES), converter=normalize_namespaces
    )
    host_uids: int = attrs.field(default=1, validator=_host_uids)
    guest_uid: int = attrs.field(default=0, validator=identifier)
    guest_gid: int = attrs.field(default=0, validator=identifier)
    writable_root: bool = attrs.field(default=False, validator=boolean)
    populate: Callable[[], object] | None = attrs.field(default=None, validator=_optional_callable)
    loopback_network: bool = attrs.field(default=True, validator=boolean)
    lock_mounts: bool = attrs.field(default=True, validator=boolean)
    hostname: str | None = attrs.field(default=None, validator=_hostname)
    no_new_privs: bool = attrs.field(default=True, validator=boolean)
    pass_fds: tuple[int, ...] = attrs.field(default=(), converter=_pass_fds)
    seccomp: SeccompPolicy | None = attrs.field(default=DEFAULT_SECCOMP, validator=_seccomp)
    capabilities: frozenset[str] | None = attrs.field(
        default=DEFAULT_CAPABILITIES, converter=_capabilities
    )
    limits: CgroupLimits | None = attrs.field(default=None, converter=_limits)
    network: str | None = attrs.field(default=None, validator=_network)

    @property
    def keeps_default_capabilities(self) -> bool:
        """True when `capabilities` is the default set, which keeps what the process holds."""
        return self.capabilities == DEFAULT_CAPABILITIES


# A service's spelling of a container option, for the hint of a TypeError.
_SERVICE_SPELLINGS = {"mappings": "mounts", "environment": "env", "directory": "cwd"}


@hint_unknown_keywords("container", _SERVICE_SPELLINGS)
@attrs.frozen(kw_only=True)
class ContainerSpec(SharedOptions):
    """Every option of a container, checked when the spec is made.

    `run_container(target, spec, **options)` and every other entry point
    take one; keywords given beside it override its fields, as
    `attrs.evolve` does. A spec is frozen, hashable and picklable, so it can
    be defined once and shared by many starts.

    Args:
        root: None for a fresh tmpfs root (as Guix); or the absolute path of
            an existing directory of the host to use as the root (missing
            mount points are created in it).
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
            cannot unmount them to see what they cover, nor remount them
            writable (maps only the guest uid/gid in a nested user
            namespace). With False, a container that keeps CAP_SYS_ADMIN
            (capabilities=None) can undo them, the masks of /proc and
            /sys included.
        hostname: the host name in the container's "uts" namespace.
        env: None for an empty environment (Guix purifies it); else exactly
            this mapping (kept as (name, value) pairs: `dict(spec.env)`).
        cwd: the working directory, a path inside the container.
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
            perf_event_open, bpf ... fail with EPERM; for a root caller,
            setting the setuid or setgid bit fails too), a SeccompPolicy of
            your own, or None for no filter.
        capabilities: the capabilities the target keeps, by name
            ("CAP_NET_BIND_SERVICE" or "net_bind_service"); every other one
            is dropped from its bounding, permitted, effective, inheritable
            and ambient sets, so no exec brings it back. By default
            DEFAULT_CAPABILITIES (Podman's set: no CAP_SYS_ADMIN,
            CAP_NET_ADMIN, CAP_NET_RAW or CAP_SYS_PTRACE; for a root
            caller, also without CAP_SETFCAP and CAP_FSETID, which would let
            files in a writable mapping grant privilege on the host, and
            without which no uid 0 can be mapped into a nested user
            namespace), of which the process keeps what it holds (a set
            equal to DEFAULT_CAPABILITIES counts as it). The default set is
            root's: a target that is not uid 0 (`guest_uid`, a service's
            `user=`) keeps no capability at all unless it names some, as
            systemd's User=. ALL_CAPABILITIES or None
            keep everything root has in the container's user namespace. A
            set of your own must be held (no "user" namespace and not root:
            PermissionError when the container starts).
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

    Raises:
        TypeError, ValueError: naming the field and what to give instead,
            when the spec is made (a rule between fields, such as hostname=
            without the "uts" namespace, is a ValueError too).
    """

    mounts: tuple[MountItem, ...] = attrs.field(default=(), converter=_mount_items)
    env: tuple[tuple[str, str], ...] | None = attrs.field(default=None, converter=_env)
    cwd: str = attrs.field(default="/", converter=_cwd)
    child_is_pid1: bool = attrs.field(default=True, validator=boolean)
    new_session: bool = attrs.field(default=True, validator=boolean)

    def __attrs_post_init__(self) -> None:
        check_rules(
            self,
            needing_mnt=(("root", self.root), ("mounts", self.mounts), ("populate", self.populate)),
        )
        if not self.child_is_pid1 and "pid" not in self.namespaces:
            raise ValueError(
                "child_is_pid1=False puts an init in front of the target as PID 1 of a new pid "
                "namespace; add 'pid' to namespaces",
            )


def check_rules(options: SharedOptions, needing_mnt: tuple[tuple[str, object], ...]) -> None:
    """Check the rules between the fields of a container's options.

    `needing_mnt` pairs the names of fields that only make sense with a
    mount namespace with their values (a service names its own).

    Raises:
        ValueError: naming the fields and what to change (the field to
            change comes first in the message).
    """
    names = options.namespaces
    if "mnt" not in names:
        for field, given in needing_mnt:
            if given:
                raise ValueError(
                    f"{field}= needs the 'mnt' namespace: without it the container shares "
                    "the host's mounts; add 'mnt' to namespaces",
                )
    ids = (options.host_uids, options.guest_uid, options.guest_gid)
    if "user" in names:
        if max(options.guest_uid, options.guest_gid) + options.host_uids - 1 > MAX_ID:
            raise ValueError("guest ids plus host_uids run past the largest id")
    elif ids != (1, 0, 0):
        raise ValueError(
            "host_uids, guest_uid and guest_gid describe the id maps of a user namespace; "
            "add 'user' to namespaces or leave them at their defaults",
        )
    for field, value, namespace, why in (
        ("hostname", options.hostname, "uts", "or it would rename the host"),
        (
            "limits",
            options.limits,
            "pid",
            "so that every process of the container ends with it and its cgroups can be removed",
        ),
        (
            "network",
            options.network,
            "net",
            "to connect the container's own network namespace to the host",
        ),
    ):
        if value is not None and namespace not in names:
            raise ValueError(
                f"{field}= needs the {namespace!r} namespace, {why}; "
                f"add {namespace!r} to namespaces",
            )


class ContainerOptions(TypedDict, total=False):
    """The keyword options of `run_container` and the other entry points, for type checkers.

    One key per field of `ContainerSpec`, with the types its converters
    accept; a misspelt keyword is a type error (and a TypeError at run time).
    """

    root: str | os.PathLike[str] | None
    mounts: Iterable[MountItem]
    namespaces: Iterable[str]
    host_uids: int
    guest_uid: int
    guest_gid: int
    writable_root: bool
    populate: Callable[[], object] | None
    loopback_network: bool
    lock_mounts: bool
    hostname: str | None
    env: Mapping[str, str] | None
    cwd: str | os.PathLike[str]
    child_is_pid1: bool
    new_session: bool
    no_new_privs: bool
    pass_fds: Iterable[int]
    seccomp: SeccompPolicy | None
    capabilities: Iterable[str] | None
    limits: Mapping[str, object] | None
    network: str | None


_FIELDS = frozenset(field.name for field in attrs.fields(ContainerSpec))


def resolve_spec(spec: ContainerSpec | None, options: Mapping[str, Any]) -> ContainerSpec:
    """Return `spec` (or the defaults) with `options` applied over it.

    Raises:
        TypeError: `spec` is not a ContainerSpec, or an option is unknown
            (with the closest known name).
        ValueError: as ContainerSpec raises.
    """
    if spec is None:
        spec = ContainerSpec()
    elif not isinstance(spec, ContainerSpec):
        raise TypeError(f"spec must be a ContainerSpec, not {spec!r}")
    unknown = sorted(set(options) - _FIELDS)
    if unknown:
        raise unknown_keyword("container", unknown[0], _FIELDS, _SERVICE_SPELLINGS)
    return attrs.evolve(spec, **options) if options else spec
