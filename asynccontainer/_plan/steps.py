"""The steps of a container's set-up: plain data, executed in order by the child.

Each step is one thing the kernel is asked to do, with every value decided
in the caller: the child looks at no option and takes no decision, and a
step that fails is reported by its index, so that the caller can re-raise
the error naming the path the user gave (`path`) and the step (`describe`).

Paths of the container (`path`, `target`) are resolved beneath the new
root by the executor, never from the host's root; `source` paths are host
paths, given by the caller, opened before anything is mounted.

Slots are small integers naming fds the executor holds between steps (a
copied tree, /proc of the host) or objects it unpickled (the target).
"""

from __future__ import annotations

import attrs

__all__ = [
    "Bind",
    "BringLoopbackUp",
    "Call",
    "Chdir",
    "Chmod",
    "CloneTree",
    "ContainerPlan",
    "ExcursionPlan",
    "Exec",
    "InstallPassedFds",
    "InstallStdio",
    "JoinNamespaces",
    "KeepCapabilities",
    "LimitBoundingSet",
    "LoadCallable",
    "LoadSeccomp",
    "LockMounts",
    "MakeDirectory",
    "MakeLink",
    "MakeMountsPrivate",
    "MaskPath",
    "MountFileSystem",
    "NewRoot",
    "OpenPath",
    "PivotRoot",
    "ReadOnlyPath",
    "RemountReadOnly",
    "RemovePath",
    "RunCallable",
    "SetHostname",
    "SetIds",
    "SetNoNewPrivs",
    "SetPropagation",
    "SetResourceLimits",
    "SetUmask",
    "StartInit",
    "StartSession",
    "Step",
    "Unshare",
    "WriteFile",
]


class Step:
    """A step of a set-up. `path` is the user's path it is about, for errors."""

    __slots__ = ()

    @property
    def path(self) -> str | None:
        """The path an error of this step is about (the user's own), or None."""
        return None

    def describe(self) -> str:
        """Say what the step does, for the note of an error."""
        raise NotImplementedError

    def __repr__(self) -> str:
        # One repr for every step, rather than one generated per class by
        # attrs: that halves this module's import, which every first
        # container of a process waits for (issue 13).
        fields = attrs.fields(type(self))  # type: ignore[arg-type]  # every subclass is attrs'
        shown = (f"{a.name}={getattr(self, a.name)!r}" for a in fields if a.repr)
        return f"{type(self).__name__}({', '.join(shown)})"


class _OnTarget(Step):
    """A step about the container path `target`, which its errors name."""

    __slots__ = ()
    target: str

    @property
    def path(self) -> str:
        """The container path the step is about, as the user gave it."""
        return self.target


# -- the process, before any mount -------------------------------------------------


@attrs.frozen(repr=False)  # the repr is Step's
class Unshare(Step):
    """Enter the new namespaces of `flags` (CLONE_NEW*), made after the clone.

    A new mount or uts namespace is a copy of the one the process is in:
    made after the go, it copies the host's current state. A cgroup
    namespace is rooted at the cgroups the server made (limits=).
    """

    flags: int

    def describe(self) -> str:
        return "entering namespaces of its own"


@attrs.frozen(repr=False)  # the repr is Step's
class LoadCallable(Step):
    """Unpickle a callable into `slot`, while the host's modules are still in reach."""

    slot: int
    what: str
    pickled: bytes = attrs.field(repr=False)
    sys_path: tuple[str, ...] = attrs.field(repr=False)

    def describe(self) -> str:
        return f"unpickling the {self.what}"


@attrs.frozen(repr=False)  # the repr is Step's
class InstallStdio(Step):
    """Make the three fds received with the plan the process's 0, 1 and 2."""

    def describe(self) -> str:
        return "installing stdin, stdout and stderr"


@attrs.frozen(repr=False)  # the repr is Step's
class SetHostname(Step):
    """Set the host name of the container's "uts" namespace."""

    name: str

    def describe(self) -> str:
        return f"setting the host name to {self.name!r}"


# -- mounts ------------------------------------------------------------------------


@attrs.frozen(repr=False)  # the repr is Step's
class MakeMountsPrivate(Step):
    """Make every mount of the (copied) mount namespace private, recursively.

    Without it pivot_root fails with EINVAL on hosts whose / is shared
    (systemd's default), and mounts made below would propagate out.
    """

    def describe(self) -> str:
        return "making every mount private"


@attrs.frozen(repr=False)  # the repr is Step's
class OpenPath(Step):
    """Open a host path O_PATH into `slot` (as the caller would resolve it).

    With `magic`, the file system it is on must be of that type (statfs(2)'s
    f_type): a /proc written through must be a procfs, not a directory
    dressed as one (runc's CVE-2019-16884).
    """

    slot: int
    source: str
    magic: int | None = None

    @property
    def path(self) -> str:
        return self.source

    def describe(self) -> str:
        return f"opening {self.source} of the host"


@attrs.frozen(repr=False)  # the repr is Step's
class CloneTree(Step):
    """Copy the host's mount tree at `source` into `slot`, detached (open_tree, recursive).

    With `optional`, a source that does not exist leaves the slot empty,
    and the steps that use it do nothing. With `nofollow`, a source that is
    a symbolic link is refused (ELOOP), whatever it points to.
    """

    slot: int
    source: str
    optional: bool = False
    nofollow: bool = False

    @property
    def path(self) -> str:
        return self.source

    def describe(self) -> str:
        return f"opening {self.source} of the host to map it"


@attrs.frozen(repr=False)  # the repr is Step's
class NewRoot(Step):
    """Make the new root: a tmpfs, or the tree in `slot`; attach it at `staging`.

    Every later mount step works beneath it, by fd; the staging directory
    only gives pivot_root a mount point of this namespace.
    """

    staging: str
    slot: int | None = None
    tmpfs_mode: str = "0755"

    def describe(self) -> str:
        what = "a tmpfs" if self.slot is None else "the given root"
        return f"mounting {what} as the new root"


@attrs.frozen(repr=False)  # the repr is Step's
class MountFileSystem(_OnTarget):
    """Mount a new file system of `fstype` on `target` (created as a directory if missing).

    `attributes` are MOUNT_ATTR_* bits; `options` are fsconfig(2)
    parameters ("mode", "0755") or flags ("newinstance", None); an errno in
    `tolerate` leaves the target as it is.
    """

    target: str
    fstype: str
    source: str
    attributes: int = 0
    options: tuple[tuple[str, str | None], ...] = ()
    tolerate: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"mounting {self.fstype} on {self.target}"


@attrs.frozen(repr=False)  # the repr is Step's
class Bind(_OnTarget):
    """Attach the tree copied into `slot` on `target` (a directory or a file, as the source).

    `attr_set` and `attr_clr` (MOUNT_ATTR_*) are applied to the whole
    copied tree first (mount_setattr(2)). An empty slot (an optional source
    that is missing) does nothing.
    """

    slot: int
    target: str
    attr_set: int = 0
    attr_clr: int = 0

    def describe(self) -> str:
        return f"mapping on {self.target}"


@attrs.frozen(repr=False)  # the repr is Step's
class SetPropagation(_OnTarget):
    """Set the propagation (MS_SHARED, MS_SLAVE, MS_PRIVATE, MS_UNBINDABLE) of `target`."""

    target: str
    propagation: int

    def describe(self) -> str:
        return f"setting the propagation of {self.target}"


@attrs.frozen(repr=False)  # the repr is Step's
class MakeLink(Step):
    """Make the symbolic link `link` pointing to `target`; an identical link is kept."""

    link: str
    target: str

    @property
    def path(self) -> str:
        return self.link

    def describe(self) -> str:
        return f"making the link {self.link} -> {self.target}"


@attrs.frozen(repr=False)  # the repr is Step's
class ReadOnlyPath(_OnTarget):
    """Make `target` a read-only bind of itself, recursively (runc's readonlyPaths).

    A target missing in the container is left alone.
    """

    target: str

    def describe(self) -> str:
        return f"making {self.target} read-only"


@attrs.frozen(repr=False)  # the repr is Step's
class MaskPath(_OnTarget):
    """Cover `target`: /dev/null over a file, an empty read-only tmpfs over a directory.

    runc's maskedPaths. A target missing in the container is left alone.
    `null_slot` holds the host's /dev/null, opened before anything was
    mounted.
    """

    target: str
    null_slot: int

    def describe(self) -> str:
        return f"masking {self.target}"


@attrs.frozen(repr=False)  # the repr is Step's
class PivotRoot(Step):
    """Make the new root the process's root, and detach the old one."""

    def describe(self) -> str:
        return "pivoting to the new root"


# -- after pivot_root: paths are the container's own ----------------------------------


@attrs.frozen(repr=False)  # the repr is Step's
class WriteFile(_OnTarget):
    """Create `target` with `content` if nothing is there yet (never through a link)."""

    target: str
    content: bytes
    mode: int = 0o644

    def describe(self) -> str:
        return f"writing {self.target}"


@attrs.frozen(repr=False)  # the repr is Step's
class MakeDirectory(_OnTarget):
    """Create the directory `target` and its parents if missing."""

    target: str
    mode: int = 0o755

    def describe(self) -> str:
        return f"creating the directory {self.target}"


@attrs.frozen(repr=False)  # the repr is Step's
class RemovePath(_OnTarget):
    """Remove the file `target` if it exists (a stale PID file)."""

    target: str

    def describe(self) -> str:
        return f"removing {self.target}"


@attrs.frozen(repr=False)  # the repr is Step's
class RunCallable(Step):
    """Call the callable in `slot` (the populate hook)."""

    slot: int
    what: str

    def describe(self) -> str:
        return f"running the {self.what}"


@attrs.frozen(repr=False)  # the repr is Step's
class Chmod(_OnTarget):
    """Change the mode of `target`."""

    target: str
    mode: int

    def describe(self) -> str:
        return f"changing the mode of {self.target} to {self.mode:o}"


@attrs.frozen(repr=False)  # the repr is Step's
class RemountReadOnly(_OnTarget):
    """Make the mount at `target` read-only (that mount alone, not those below it)."""

    target: str

    def describe(self) -> str:
        return f"making {self.target} read-only"


@attrs.frozen(repr=False)  # the repr is Step's
class BringLoopbackUp(Step):
    """Set IFF_UP on `lo` of the container's network namespace."""

    def describe(self) -> str:
        return "bringing the loopback interface up"


@attrs.frozen(repr=False)  # the repr is Step's
class LockMounts(Step):
    """Enter a further user and mount namespace, so that every mount is locked.

    `proc_slot` holds a /proc opened before pivot_root, to write the new
    namespace's id maps.
    """

    proc_slot: int

    def describe(self) -> str:
        return "locking the mounts"


@attrs.frozen(repr=False)  # the repr is Step's
class Chdir(_OnTarget):
    """Change the working directory to `target`."""

    target: str

    def describe(self) -> str:
        return f"changing the working directory to {self.target}"


# -- the process, after the file system ------------------------------------------------


@attrs.frozen(repr=False)  # the repr is Step's
class InstallPassedFds(Step):
    """Put the fds received after stdio at these numbers (subprocess's pass_fds)."""

    numbers: tuple[int, ...]

    def describe(self) -> str:
        return f"passing the fds {', '.join(map(str, self.numbers))}"


@attrs.frozen(repr=False)  # the repr is Step's
class StartInit(Step):
    """Fork: this process stays PID 1 as an init, the child goes on with the steps.

    `follow_child`: the init relays signals to the child and exits with its
    status (child_is_pid1=False); otherwise it relays them to every process
    of the namespace and exits when none is left (a service: a daemon's
    forking parent exits first). With `new_session` the init leaves the
    caller's session too.

    `status_fd` (an fd number the caller passed, or -1): the init writes
    the number of the signal the followed process died of there, one byte,
    before it exits with 128+N (PID 1 cannot die of a signal it sends
    itself), so that the caller reports -N as for any container; the child
    closes it, so that the target never holds it.
    """

    follow_child: bool
    new_session: bool
    status_fd: int = -1

    def describe(self) -> str:
        return "starting the init"


@attrs.frozen(repr=False)  # the repr is Step's
class LimitBoundingSet(Step):
    """Drop every capability but `keep` from the bounding set (see _forkserver.capabilities)."""

    keep: frozenset[int]
    required: bool
    keep_across_setuid: bool

    def describe(self) -> str:
        return "dropping capabilities from the bounding set"


@attrs.frozen(repr=False)  # the repr is Step's
class StartSession(Step):
    """Call setsid(); take a terminal on stdin as the controlling terminal."""

    def describe(self) -> str:
        return "starting a session of its own"


@attrs.frozen(repr=False)  # the repr is Step's
class SetResourceLimits(Step):
    """setrlimit for each (RLIMIT_*, soft, hard)."""

    limits: tuple[tuple[int, int, int], ...]

    def describe(self) -> str:
        return "setting resource limits"


@attrs.frozen(repr=False)  # the repr is Step's
class SetIds(Step):
    """setgroups, setgid, setuid, in this order (each needs what the next gives up)."""

    uid: int | None
    gid: int | None
    groups: tuple[int, ...] | None

    def describe(self) -> str:
        return f"switching to uid {self.uid} gid {self.gid}"


@attrs.frozen(repr=False)  # the repr is Step's
class SetUmask(Step):
    """Set the file creation mask."""

    mask: int

    def describe(self) -> str:
        return f"setting the umask to {self.mask:03o}"


@attrs.frozen(repr=False)  # the repr is Step's
class SetNoNewPrivs(Step):
    """PR_SET_NO_NEW_PRIVS: execve can no longer grant privileges."""

    def describe(self) -> str:
        return "setting no_new_privs"


@attrs.frozen(repr=False)  # the repr is Step's
class KeepCapabilities(Step):
    """Make the permitted, effective, inheritable and ambient sets what the bounding set kept."""

    def describe(self) -> str:
        return "dropping capabilities"


@attrs.frozen(repr=False)  # the repr is Step's
class LoadSeccomp(Step):
    """Install the compiled seccomp filter."""

    program: bytes = attrs.field(repr=False)

    def describe(self) -> str:
        return "loading the seccomp filter"


# -- the end ---------------------------------------------------------------------------


@attrs.frozen(repr=False)  # the repr is Step's
class Exec(Step):
    """Report "execing" (with the root's fd if `send_root`), then execvpe.

    With `listen_pid`, LISTEN_PID=its own PID (in its pid namespace) is
    added to `env` first: sd_listen_fds(3) takes the sockets only if it
    names the process that reads them.
    """

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = attrs.field(repr=False)
    send_root: bool = False
    listen_pid: bool = False

    @property
    def path(self) -> str:
        return self.argv[0]

    def describe(self) -> str:
        return f"executing {self.argv[0]}"


@attrs.frozen(repr=False)  # the repr is Step's
class Call(Step):
    """Report "ready" (with the root's fd if `send_root`), then call the callable in `slot`."""

    slot: int
    env: tuple[tuple[str, str], ...] = attrs.field(repr=False)
    send_root: bool = False

    def describe(self) -> str:
        return "calling the target"


@attrs.frozen(repr=False)  # the repr is Step's
class JoinNamespaces(Step):
    """Join the namespaces of process `pid` (an excursion's, in the C executor)."""

    pid: int

    def describe(self) -> str:
        return f"joining the namespaces of PID {self.pid}"


@attrs.frozen
class ContainerPlan:
    """What a container process does, step by step; `steps[-1]` is an Exec or a Call.

    The fds received with the plan (and the handshake) are first moved to
    `fd_floor` and up, out of the way of the numbers pass_fds take.
    """

    steps: tuple[Step, ...]
    fd_floor: int = 3


@attrs.frozen
class ExcursionPlan:
    """What an excursion process runs once it has joined the target's namespaces."""

    env: tuple[tuple[str, str], ...]
    # Exactly one of command and pickled_callable is set.
    command: tuple[str, ...] | None
    pickled_callable: bytes | None
    # Send the callable's value (or exception) back instead of an exit status.
    want_value: bool
    sys_path: tuple[str, ...]
