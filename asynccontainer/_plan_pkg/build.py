"""The caller's decision: a container spec and a target, turned into what is sent.

`plan_container` checks what depends on this machine rather than on the
spec's values (the root exists, the caller may map many ids, cgroups can be
made, pass_fds are open), then builds the `ContainerConfig` the container
process executes and the `SpawnRequest` the fork server needs. The target
and the populate hook travel as cloudpickle bytes, so that lambdas and
closures work; they are unpickled in the container process itself, before
pivot_root, while the host's modules are still in reach.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence

import attrs

from . import _kernel
from ._spec.capabilities import capability_numbers
from ._spec.container import ContainerSpec
from ._spec.filesystems import MountItem
from ._spec.limits import plan_cgroups
from ._spec.namespaces import namespace_clone_flags
from ._spec.seccomp import compile_policy
from ._wire import IdMap, SpawnRequest

__all__ = [
    "ContainerConfig",
    "ExcursionConfig",
    "ServiceConfig",
    "Target",
    "check_command",
    "pickle_callable",
    "plan_container",
]

Target = Sequence[str | os.PathLike[str]] | Callable[[], object]
"""A command (argv, run with execvp semantics) or a callable taking no arguments."""


@attrs.frozen
class ServiceConfig:
    """Shepherd's exec-command steps, run in the container right before exec.

    Names (user, group, resource) were resolved to numbers in the caller.
    """

    pid_file: str | None
    uid: int | None
    gid: int | None
    groups: tuple[int, ...] | None
    umask: int | None
    # (RLIMIT_* number, soft, hard)
    rlimits: tuple[tuple[int, int, int], ...]
    directory: str
    # Run a small init as PID 1 that outlives a daemon's forking parent.
    init: bool


@attrs.frozen
class ContainerConfig:
    """Everything the container process needs to set itself up and run the target."""

    namespaces: frozenset[str]
    root: str | None
    mounts: tuple[MountItem, ...]
    writable_root: bool
    loopback_network: bool
    lock_mounts: bool
    hostname: str | None
    env: tuple[tuple[str, str], ...]
    cwd: str
    # Exactly one of command and pickled_callable is set.
    command: tuple[str, ...] | None
    pickled_callable: bytes | None
    pickled_populate: bytes | None
    # The caller's sys.path, so the child can import what the callable
    # refers to by reference (a function of a test module, say).
    sys_path: tuple[str, ...]
    # False: a small init is PID 1 and the target runs as PID 2.
    child_is_pid1: bool = True
    # The target calls setsid(), and takes a terminal on stdin as its
    # controlling terminal.
    new_session: bool = True
    # Send the caller an O_PATH fd of the container's root with the ready
    # reply: files inside stay reachable after the first process exits.
    send_root: bool = False
    # prctl(PR_SET_NO_NEW_PRIVS) before the target runs.
    no_new_privs: bool = True
    # The capability numbers the target keeps (None: leave them all), and
    # whether each must be held (else the ones not held are left out).
    capabilities: frozenset[int] | None = None
    capabilities_required: bool = True
    # The compiled seccomp filter installed last, before the target runs.
    seccomp_program: bytes | None = None
    # The fd numbers, in the container, of the fds sent after the three of
    # stdio (subprocess's pass_fds).
    pass_fds: tuple[int, ...] = ()
    # Unshare the cgroup namespace in the child, once the server has moved
    # it into its cgroups (limits=), so that its root is the container's own.
    cgroup_namespace: bool = False
    # Set for the containers of services (ServiceGroup.start).
    service: ServiceConfig | None = None


@attrs.frozen
class ExcursionConfig:
    """What an excursion process runs once it has joined the target's namespaces."""

    env: tuple[tuple[str, str], ...]
    # Exactly one of command and pickled_callable is set.
    command: tuple[str, ...] | None
    pickled_callable: bytes | None
    # Send the callable's value (or exception) back instead of an exit status.
    want_value: bool
    sys_path: tuple[str, ...]


def pickle_callable(what: str, function: Callable[[], object]) -> bytes:
    """Return `function` pickled with cloudpickle, for a container to run.

    Raises:
        TypeError: naming `what`, when it refers to what cannot be pickled.
    """
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


def check_command(target: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """Return a command as a tuple of str.

    Raises:
        TypeError, ValueError: for a string, an empty command, or arguments
            that are not str or hold a NUL byte.
    """
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


def _check_machine(spec: ContainerSpec) -> None:
    """Check what the spec asks of this machine and this caller, before anything is spawned.

    Raises:
        FileNotFoundError, NotADirectoryError: for a `root` that is not a directory.
        ValueError: for pass_fds that are not open, host_uids > 1 without
            root, or a seccomp filter without no_new_privs that cannot be loaded.
        PermissionError, OSError: for limits= and network= this caller may not have.
    """
    if spec.root is not None:
        if not os.path.exists(spec.root):
            raise FileNotFoundError(errno.ENOENT, "the root directory does not exist", spec.root)
        if not os.path.isdir(spec.root):
            raise NotADirectoryError(errno.ENOTDIR, "the root must be a directory", spec.root)
    for fd in spec.pass_fds:
        try:
            os.fstat(fd)
        except OSError:
            raise ValueError(f"pass_fds: {fd} is not an open file descriptor") from None
    privileged = os.geteuid() == 0
    if "user" in spec.namespaces and spec.host_uids > 1 and not privileged:
        raise ValueError(
            f"host_uids={spec.host_uids}: only root may map more than one id into a user "
            "namespace (user_namespaces(7)); use host_uids=1 or run as root"
        )
    if (
        spec.seccomp is not None
        and not spec.no_new_privs
        and "user" not in spec.namespaces
        and not privileged
    ):
        # seccomp(2): without no_new_privs, loading a filter takes
        # CAP_SYS_ADMIN, which only root or a user namespace gives.
        raise ValueError(
            "a seccomp filter without no_new_privs needs root or a user namespace; "
            "keep no_new_privs=True or pass seccomp=None"
        )
    if spec.limits is not None:
        # Unwritable cgroups or a missing controller, reported before the
        # spawn; the server checks again as it creates them.
        plan_cgroups(spec.limits)
    if spec.network is not None:
        _check_veth(privileged)


def _check_veth(privileged: bool) -> None:
    if not privileged:
        raise PermissionError(
            errno.EPERM,
            "network='veth' creates an interface in the host's network namespace, which "
            "only root (CAP_NET_ADMIN) may do",
        )
    import importlib.util

    if importlib.util.find_spec("pyroute2") is None:
        raise ModuleNotFoundError(
            "network='veth' needs pyroute2: pip install 'asynccontainer[network]'",
            name="pyroute2",
        )


def plan_container(
    spec: ContainerSpec, target: Target, *, service: ServiceConfig | None = None
) -> tuple[ContainerConfig, SpawnRequest]:
    """Decide everything about one container: what its process does, and what the server does.

    Raises:
        TypeError, ValueError: for a bad target, or as `_check_machine`.
        OSError: as `_check_machine`.
    """
    if callable(target):
        command = None
        pickled_callable: bytes | None = pickle_callable("target", target)
    else:
        command = check_command(target)
        pickled_callable = None
    _check_machine(spec)
    names = spec.namespaces
    id_map = IdMap(spec.guest_uid, spec.guest_gid, spec.host_uids) if "user" in names else None
    populate = spec.populate
    config = ContainerConfig(
        namespaces=names,
        root=spec.root,
        mounts=spec.mounts,
        writable_root=spec.writable_root,
        loopback_network=spec.loopback_network,
        lock_mounts=spec.lock_mounts,
        hostname=spec.hostname,
        env=spec.env or (),
        cwd=spec.cwd,
        command=command,
        pickled_callable=pickled_callable,
        pickled_populate=pickle_callable("populate hook", populate) if populate else None,
        sys_path=tuple(sys.path) if pickled_callable or populate else (),
        child_is_pid1=spec.child_is_pid1,
        new_session=spec.new_session,
        no_new_privs=spec.no_new_privs,
        pass_fds=spec.pass_fds,
        seccomp_program=None if spec.seccomp is None else compile_policy(spec.seccomp),
        capabilities=None if spec.capabilities is None else capability_numbers(spec.capabilities),
        # The default set keeps what it can: a caller without root and
        # without a user namespace holds none of it.
        capabilities_required=not spec.keeps_default_capabilities,
        service=service,
    )
    flags = namespace_clone_flags(names)
    if spec.limits is not None and "cgroup" in names:
        # The child unshares it once it is in its own cgroups (see _forkserver.cgroupfs).
        flags &= ~_kernel.CLONE_NEWCGROUP
        config = attrs.evolve(config, cgroup_namespace=True)
    return config, SpawnRequest(flags, id_map, spec.limits, spec.network)
