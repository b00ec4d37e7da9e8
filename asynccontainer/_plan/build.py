"""The caller's decision: a container spec and a target, turned into steps.

`plan_container` checks what depends on this machine rather than on the
spec's values (the root exists, the caller may map many ids, cgroups can be
made, pass_fds are open), then builds the `ContainerPlan` the container
process executes, step by step, and the `SpawnRequest` the fork server
needs. Every rule lives here, none in the child: which file systems, in
which order, which masks, whether an init, the order of the capability
drop, no_new_privs and seccomp. The target and the populate hook travel as
cloudpickle bytes, so that lambdas and closures work; they are unpickled
in the container process itself, before pivot_root, while the host's
modules are still in reach.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable, Sequence

import attrs

from .. import _kernel
from .._kernel import mounts as _mounts
from .._spec.capabilities import capability_numbers
from .._spec.container import ContainerSpec
from .._spec.filesystems import FileSystem, FileSystemMapping, MountItem, Symlink
from .._spec.limits import plan_cgroups
from .._spec.namespaces import namespace_clone_flags
from .._spec.seccomp import compile_policy
from .._wire import IdMap, SpawnRequest
from . import steps

__all__ = [
    "MASKED_PATHS",
    "READ_ONLY_PATHS",
    "Extras",
    "Target",
    "check_command",
    "pickle_callable",
    "plan_container",
    "staging_directory",
]

Target = Sequence[str | os.PathLike[str]] | Callable[[], object]
"""A command (argv, run with execvp semantics) or a callable taking no arguments."""


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


# Host directories the new root may be attached to, best first. The mount
# only covers the directory in the container's own copy of the mount
# namespace, and nothing is looked up through it: every host path the
# set-up needs is opened before.
_STAGING_CANDIDATES = ("/tmp", "/mnt", "/var/tmp", "/run")

# The device nodes bound from the host, as Guix does: a process in a user
# namespace may not mknod(2) them (user_namespaces(7)). /dev/ptmx is a link
# to the container's own devpts instance instead.
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty", "fuse")

# What the host's kernel exposes in /proc and /sys that no container should
# change or read: Docker's and runc's defaults (moby's oci/defaults.go,
# ReadonlyPaths and MaskedPaths). /proc/sys is host-wide for most of its
# files, and a container whose root is the host's root (a root caller's)
# passes procfs's uid checks: kernel.core_pattern alone runs a program of
# its choice as host root. /sys/devices/virtual/powercap leaks energy
# counters (CVE-2020-8694, "PLATYPUS").
READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)

# MOUNT_FLAGS names as mount_setattr(2)/fsmount(2) attributes.
_ATTRIBUTES = {
    "read-only": _mounts.MOUNT_ATTR_RDONLY,
    "no-suid": _mounts.MOUNT_ATTR_NOSUID,
    "no-dev": _mounts.MOUNT_ATTR_NODEV,
    "no-exec": _mounts.MOUNT_ATTR_NOEXEC,
    "no-diratime": _mounts.MOUNT_ATTR_NODIRATIME,
}
_ATIME = {
    "no-atime": _mounts.MOUNT_ATTR_NOATIME,
    "strict-atime": _mounts.MOUNT_ATTR_STRICTATIME,
    "relative-atime": _mounts.MOUNT_ATTR_RELATIME,
}
# Superblock flags, which a new file system takes as fsconfig(2) flags.
_SUPERBLOCK_FLAGS = {"read-only": "ro", "lazy-time": "lazytime"}

_NO_SUID_DEV_EXEC = _mounts.MOUNT_ATTR_NOSUID | _mounts.MOUNT_ATTR_NODEV | _mounts.MOUNT_ATTR_NOEXEC

_HOSTS = b"127.0.0.1 localhost\n::1 localhost\n"


@functools.cache
def staging_directory() -> str:
    """Return the host directory the new root is attached to before pivot_root.

    Raises:
        FileNotFoundError: when none of the candidates is a directory.
    """
    for candidate in _STAGING_CANDIDATES:
        if os.path.isdir(candidate) and not os.path.islink(candidate):
            return candidate
    raise FileNotFoundError(
        errno.ENOENT,
        "no directory to attach the container's root to; create /tmp on the host",
        _STAGING_CANDIDATES[0],
    )


@attrs.frozen
class Extras:
    """What a service adds to its container's plan: Shepherd's exec-command steps.

    Names (user, group, resource) are resolved to numbers by the caller.
    """

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    umask: int | None = None
    # (RLIMIT_* number, soft, hard)
    rlimits: tuple[tuple[int, int, int], ...] = ()
    # An init that stays while any process of the pid namespace is left.
    init_for_all: bool = False
    # Steps once the root is in place and still writable.
    prepare: tuple[steps.Step, ...] = ()
    # Send the caller an O_PATH fd of the container's root with the ready
    # reply: files inside stay reachable after the first process exits.
    send_root: bool = False
    # Host files mapped writable at their own path, refused if they are a
    # symbolic link (a service's log file, in a directory its user may
    # write: a link there must not map a file of root's into it).
    writable_files: tuple[str, ...] = ()
    # Listening sockets received first and placed at 3, 4 ... (socket
    # activation), with LISTEN_PID set at the exec.
    listen_fds: int = 0


class _Slots:
    """Hands out the small integers that name fds and objects between steps."""

    def __init__(self) -> None:
        self._next = 0

    def new(self) -> int:
        self._next += 1
        return self._next


def _mount_attributes(flags: frozenset[str]) -> tuple[int, int]:
    """Return (attr_set, attr_clr) for mount_setattr(2) from MOUNT_FLAGS names."""
    attr_set = 0
    attr_clr = 0
    for name in flags:
        if name in _ATTRIBUTES:
            attr_set |= _ATTRIBUTES[name]
        elif name in _ATIME:
            # The atime modes are a field, not bits: it is cleared, then set.
            attr_clr |= _mounts.MOUNT_ATTR__ATIME
            attr_set |= _ATIME[name]
    return attr_set, attr_clr


def _options(item: FileSystem) -> tuple[tuple[str, str | None], ...]:
    """Return a file system's option string (and superblock flags) as fsconfig(2) parameters."""
    options: list[tuple[str, str | None]] = []
    for text in (item.options or "").split(","):
        if text:
            key, equals, value = text.partition("=")
            options.append((key, value if equals else None))
    options.extend(
        (_SUPERBLOCK_FLAGS[name], None) for name in item.flags if name in _SUPERBLOCK_FLAGS
    )
    return tuple(options)


def _item_steps(item: MountItem, slots: _Slots) -> tuple[list[steps.Step], list[steps.Step]]:
    """Return (steps opening host paths, steps mounting beneath the root) for one mount item."""
    if isinstance(item, Symlink):
        return [], [steps.MakeLink(item.path, item.target)]
    file_system = item.to_bind_mount() if isinstance(item, FileSystemMapping) else item
    after: list[steps.Step] = []
    if file_system.is_bind_mount:
        slot = slots.new()
        opening: list[steps.Step] = [steps.CloneTree(slot, file_system.device)]
        attr_set, attr_clr = _mount_attributes(file_system.flags)
        after.append(steps.Bind(slot, file_system.mount_point, attr_set, attr_clr))
    else:
        opening = []
        attr_set, _ = _mount_attributes(file_system.flags)
        after.append(
            steps.MountFileSystem(
                file_system.mount_point,
                file_system.type,
                file_system.device,
                attr_set,
                _options(file_system),
            )
        )
    propagation = file_system.propagation_flags()
    if propagation:
        after.append(steps.SetPropagation(file_system.mount_point, propagation))
    return opening, after


def _dev_steps(slots: _Slots, console: str | None) -> tuple[list[steps.Step], list[steps.Step]]:
    """Return the steps of /dev: a tmpfs, the host's device nodes, devpts, console, links."""
    opening: list[steps.Step] = []
    after: list[steps.Step] = [
        steps.MountFileSystem(
            "/dev",
            "tmpfs",
            "none",
            _mounts.MOUNT_ATTR_NOSUID | _mounts.MOUNT_ATTR_NOEXEC | _mounts.MOUNT_ATTR_STRICTATIME,
            (("mode", "755"),),
        )
    ]
    for node in DEVICE_NODES:
        slot = slots.new()
        # A host without the device leaves the slot empty, and the bind out.
        opening.append(steps.CloneTree(slot, f"/dev/{node}", optional=True))
        after.append(steps.Bind(slot, f"/dev/{node}"))
    # A private devpts instance, so the container sees only its own
    # terminals (Documentation/filesystems/devpts.rst).
    after.append(
        steps.MountFileSystem(
            "/dev/pts",
            "devpts",
            "devpts",
            _mounts.MOUNT_ATTR_NOSUID | _mounts.MOUNT_ATTR_NOEXEC,
            (("newinstance", None), ("ptmxmode", "0666"), ("mode", "0620")),
        )
    )
    after.append(steps.MakeLink("/dev/ptmx", "pts/ptmx"))
    if console is not None:
        slot = slots.new()
        opening.append(steps.CloneTree(slot, console))
        after.append(steps.Bind(slot, "/dev/console"))
    after.append(steps.MakeLink("/dev/fd", "/proc/self/fd"))
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        after.append(steps.MakeLink(f"/dev/{name}", f"/proc/self/fd/{number}"))
    return opening, after


def _file_system_steps(
    spec: ContainerSpec, slots: _Slots, console: str | None, extras: Extras, proc_slot: int | None
) -> list[steps.Step]:
    """Return Guix's mount-file-systems as steps, by fd, with the masks of /proc and /sys.

    Every host path is opened first; the new root is made; everything else
    is created and mounted beneath it; then pivot_root, and what needs the
    final tree.
    """
    names = spec.namespaces
    opening: list[steps.Step] = [steps.MakeMountsPrivate()]
    if proc_slot is not None:
        # The id maps of the locking namespace are written through it.
        opening.append(steps.OpenPath(proc_slot, "/proc", magic=_kernel.PROC_SUPER_MAGIC))
    root_slot = None
    if spec.root is not None:
        root_slot = slots.new()
        opening.append(steps.CloneTree(root_slot, spec.root))
    beneath: list[steps.Step] = []
    if "pid" in names:
        # A proc instance shows the pid namespace it is mounted from.
        beneath.append(steps.MountFileSystem("/proc", "proc", "proc", _NO_SUID_DEV_EXEC))
    if "net" in names:
        # sysfs wants CAP_SYS_ADMIN over the current net namespace.
        beneath.append(
            steps.MountFileSystem(
                "/sys",
                "sysfs",
                "sysfs",
                _NO_SUID_DEV_EXEC | _mounts.MOUNT_ATTR_RDONLY,
                (("ro", None),),
                tolerate=(errno.EPERM,),
            )
        )
    for part in (_dev_steps(slots, console), *(_item_steps(item, slots) for item in spec.mounts)):
        opening.extend(part[0])
        beneath.extend(part[1])
    for path in extras.writable_files:
        slot = slots.new()
        opening.append(steps.CloneTree(slot, path, nofollow=True))
        beneath.append(steps.Bind(slot, path))
    # Last, so that they hold over whatever the mounts put there.
    beneath.extend(steps.ReadOnlyPath(path) for path in READ_ONLY_PATHS)
    null_slot = slots.new()
    opening.append(steps.OpenPath(null_slot, "/dev/null"))
    beneath.extend(steps.MaskPath(path, null_slot) for path in MASKED_PATHS)

    after: list[steps.Step] = [steps.PivotRoot()]
    if "net" in names and spec.loopback_network and spec.root is None:
        after.append(steps.WriteFile("/etc/hosts", _HOSTS))
    after.extend(extras.prepare)
    if spec.populate is not None:
        after.append(steps.RunCallable(_POPULATE_SLOT, "populate hook"))
    if spec.root is None:
        after.append(steps.Chmod("/", 0o755))
    if not spec.writable_root:
        after.append(steps.RemountReadOnly("/"))
    new_root = steps.NewRoot(staging_directory(), root_slot)
    return [*opening, new_root, *beneath, *after]


_TARGET_SLOT = -1
_POPULATE_SLOT = -2


def _loading_steps(spec: ContainerSpec, target: Target) -> tuple[list[steps.Step], steps.Step]:
    """Return the steps unpickling the callables, and the last step (exec or call)."""
    env = spec.env or ()
    loading: list[steps.Step] = []
    if spec.populate is not None:
        pickled = pickle_callable("populate hook", spec.populate)
        loading.append(steps.LoadCallable(_POPULATE_SLOT, "populate hook", pickled, ()))
    if callable(target):
        pickled = pickle_callable("target", target)
        loading.append(steps.LoadCallable(_TARGET_SLOT, "target", pickled, ()))
        last: steps.Step = steps.Call(_TARGET_SLOT, env)
    else:
        last = steps.Exec(check_command(target), env)
    if loading:
        # The caller's sys.path, so the child can import what the callable
        # refers to by reference (a function of a test module, say).
        first = loading[0]
        assert isinstance(first, steps.LoadCallable)
        loading[0] = attrs.evolve(first, sys_path=tuple(sys.path))
    return loading, last


def _process_steps(spec: ContainerSpec, extras: Extras, status_fd: int) -> list[steps.Step]:
    """Return the steps after the file system: init, capabilities, session, ids, filters."""
    names = spec.namespaces
    result: list[steps.Step] = []
    if "pid" in names and (not spec.child_is_pid1 or extras.init_for_all):
        # PID 1 stays as the init; the target runs in its child. The init
        # leaves the caller's session too: a terminal's Ctrl-C must reach
        # the target only through the caller.
        result.append(
            steps.StartInit(
                follow_child=not extras.init_for_all,
                new_session=spec.new_session,
                status_fd=status_fd,
            )
        )
    switching_user = extras.uid is not None
    if spec.capabilities is not None:
        # Before the switch of user, which needs CAP_SETUID and would clear
        # the permitted set without PR_SET_KEEPCAPS.
        result.append(
            steps.LimitBoundingSet(
                _kept_capabilities(spec, extras),
                required=not spec.keeps_default_capabilities,
                keep_across_setuid=switching_user,
            )
        )
    if spec.new_session:
        result.append(steps.StartSession())
    if extras.rlimits:
        result.append(steps.SetResourceLimits(extras.rlimits))
    if extras.groups is not None or extras.gid is not None or extras.uid is not None:
        result.append(steps.SetIds(extras.uid, extras.gid, extras.groups))
    if extras.umask is not None:
        result.append(steps.SetUmask(extras.umask))
    return result


# A root caller's container is root, on the host, over every file it may
# write: a file capability it sets (security.capability, which needs
# CAP_SETFCAP; in a user namespace whose root is the host's root it is
# recorded for the host's root too) or a setuid bit it keeps while
# rewriting a file (CAP_FSETID) would grant privilege to whoever runs the
# file on the host. The default set keeps neither for such a caller; the
# seccomp filter refuses the setuid and setgid bits (SeccompPolicy).
_HOST_PRIVILEGE_CAPABILITIES = frozenset({"CAP_SETFCAP", "CAP_FSETID"})


def _runs_as_root(spec: ContainerSpec, extras: Extras) -> bool:
    """Return whether the target's uid is 0 (in its user namespace, if it has one)."""
    if extras.uid is not None:
        return extras.uid == 0
    if "user" in spec.namespaces:
        return spec.guest_uid == 0
    return os.geteuid() == 0


def _kept_capabilities(spec: ContainerSpec, extras: Extras) -> frozenset[int]:
    """Return the capability numbers the target keeps.

    The default set is root's: a target that is not uid 0 (a service's
    `user=`, a `guest_uid`) keeps none of it, as systemd's User= and as
    capabilities(7) would have it at exec, where ambient capabilities
    would otherwise carry it across (and setuid(0) succeed). Names given
    explicitly are kept for any uid.
    """
    assert spec.capabilities is not None
    names = spec.capabilities
    if spec.keeps_default_capabilities:
        if not _runs_as_root(spec, extras):
            return frozenset()
        if os.geteuid() == 0:
            names = names - _HOST_PRIVILEGE_CAPABILITIES
    return capability_numbers(names)


def _seccomp_program(spec: ContainerSpec) -> bytes | None:
    policy = spec.seccomp
    if policy is None:
        return None
    deny = policy.deny_setuid_files
    return compile_policy(policy, deny_setuid_files=os.geteuid() == 0 if deny is None else deny)


def _privilege_steps(spec: ContainerSpec) -> list[steps.Step]:
    """Return no_new_privs, the capability drop and the seccomp filter, in a working order.

    The filter comes last, since every step before may need what it
    denies; but without no_new_privs, loading it takes CAP_SYS_ADMIN
    (seccomp(2)), so it then comes before the capabilities go.
    """
    keep = [steps.KeepCapabilities()] if spec.capabilities is not None else []
    program = _seccomp_program(spec)
    seccomp: list[steps.Step] = [] if program is None else [steps.LoadSeccomp(program)]
    if spec.no_new_privs:
        # execve(2) can no longer grant privileges: setuid and setgid bits
        # and file capabilities are ignored (prctl(2)); a container whose
        # root can write files must not be able to make its own setuid
        # programs work.
        return [steps.SetNoNewPrivs(), *keep, *seccomp]
    return [*seccomp, *keep]


def plan_container(
    spec: ContainerSpec,
    target: Target,
    *,
    console: str | None = None,
    extras: Extras | None = None,
) -> tuple[steps.ContainerPlan, SpawnRequest]:
    """Decide everything about one container: its process's steps, and the server's request.

    `console` is the path of the terminal on the container's stdin, if it
    is one (os.ttyname), bound on /dev/console.

    Raises:
        TypeError, ValueError: for a bad target, or as `_check_machine`.
        OSError: as `_check_machine`.
    """
    extras = Extras() if extras is None else extras
    loading, last = _loading_steps(spec, target)
    _check_machine(spec)
    names = spec.namespaces
    slots = _Slots()
    plan: list[steps.Step] = []
    flags = namespace_clone_flags(names)
    # Namespaces that copy the host's state are entered after the go, not
    # at the clone: a zygote cloned ahead of need would hold a copy of the
    # mount table (or host name) as it was then, and miss a file system
    # mounted since. A cgroup namespace waits for the cgroups the server
    # makes (_forkserver.cgroupfs).
    late = flags & (_kernel.CLONE_NEWNS | _kernel.CLONE_NEWUTS)
    if spec.limits is not None:
        late |= flags & _kernel.CLONE_NEWCGROUP
    if late:
        flags &= ~late
        plan.append(steps.Unshare(late))
    plan.extend(loading)
    plan.append(steps.InstallStdio())
    if spec.hostname is not None:
        plan.append(steps.SetHostname(spec.hostname))
    lock = spec.lock_mounts and {"mnt", "user"} <= names
    proc_slot = slots.new() if lock else None
    if "mnt" in names:
        plan.extend(_file_system_steps(spec, slots, console, extras, proc_slot))
    else:
        plan.extend(extras.prepare)
    if "net" in names and spec.loopback_network:
        plan.append(steps.BringLoopbackUp())
    if proc_slot is not None:
        plan.append(steps.LockMounts(proc_slot))
    plan.append(steps.Chdir(spec.cwd))
    # With an init, the caller passes one more fd: the init's status pipe
    # (StartInit), placed above the user's.
    passed = (*range(3, 3 + extras.listen_fds), *spec.pass_fds)
    status_fd = max(passed) + 1 if passed else 3
    process = _process_steps(spec, extras, status_fd)
    if any(isinstance(step, steps.StartInit) for step in process):
        passed = (*passed, status_fd)
    if passed:
        plan.append(steps.InstallPassedFds(passed))
    plan.extend(process)
    plan.extend(_privilege_steps(spec))
    if extras.send_root:
        last = attrs.evolve(last, send_root=True)  # type: ignore[misc]
    if extras.listen_fds and isinstance(last, steps.Exec):
        last = attrs.evolve(last, listen_pid=True)
    plan.append(last)
    id_map = IdMap(spec.guest_uid, spec.guest_gid, spec.host_uids) if "user" in names else None
    request = SpawnRequest(flags, id_map, spec.limits, spec.network)
    floor = max(passed) + 1 if passed else 3
    return steps.ContainerPlan(tuple(plan), floor), request
