"""The checked description of one container, as the caller sends it to the child.

`ContainerConfig` is built by `run_container` (in the caller, where every
check happens) and unpickled by the container process. The target and the
populate hook travel as cloudpickle bytes, so that lambdas and closures work;
they are unpickled in the container process itself, before pivot_root, while
the host's modules are still in reach.
"""

from __future__ import annotations

import attrs

from ._spec.filesystems import MountItem

__all__ = ["ContainerConfig", "ExcursionConfig", "ServiceConfig"]


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
