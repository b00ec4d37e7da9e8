"""The mount steps, by file descriptor: nothing a container controls is resolved from the host.

Runs in the container process, in its own (copied) mount namespace. The
rule every step follows: host paths are opened first, before anything is
mounted (CloneTree, OpenPath); the new root is made and attached (NewRoot);
from then on every target is opened *beneath the new root's fd* with
openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS), so that a symbolic link
or a ".." found on the way, planted in a writable mapping by this or an
earlier container, resolves inside the container and never on the host
(the class of runc's CVE-2021-30465 and Kubernetes' CVE-2017-1002101;
nsjail's mount_destination_confinement tests are the catalogue). Mount
points the set-up creates itself are created relative to their parent's
fd and reopened without following any link, so one swapped in meanwhile is
refused. Mounts are made onto those fds (move_mount), never onto a path.

This departs from Guix, which mounts the new root on a temporary directory
of the host and works with path strings; bubblewrap opens sources first
too, but mounts by path.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Callable

from .. import _kernel
from .._kernel import mounts as _mounts
from .._plan import steps
from .state import State

__all__ = ["RUNNERS", "make_beneath", "open_beneath"]

_RESOLVE_IN_ROOT = _kernel.RESOLVE_IN_ROOT | _kernel.RESOLVE_NO_MAGICLINKS
_RESOLVE_HERE = _kernel.RESOLVE_NO_SYMLINKS | _kernel.RESOLVE_BENEATH

_CLONE = _mounts.OPEN_TREE_CLONE | _mounts.AT_RECURSIVE


def open_beneath(root: int, path: str, flags: int = os.O_PATH) -> int:
    """Open the container path `path` beneath the root fd `root` (links resolve inside it).

    Raises:
        OSError: ENOENT when it does not exist there; ENOSYS when openat2(2)
            is refused, as the default seccomp filter of a root caller's
            container does (see SeccompPolicy.deny_setuid_files).
    """
    try:
        return _kernel.openat2(root, path, flags, _RESOLVE_IN_ROOT)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        raise OSError(
            errno.ENOSYS,
            "openat2 is refused here: inside a root caller's container the default seccomp "
            "filter refuses it; give that container "
            "seccomp=SeccompPolicy(deny_setuid_files=False) to make containers in it",
            path,
        ) from None


def make_beneath(root: int, path: str, *, directory: bool) -> int:
    """Open `path` beneath `root`, creating it (a directory or an empty file) and its parents.

    What exists is found with `open_beneath`; what is created is created in
    its parent's fd, and opened again without following links.

    Raises:
        OSError: ELOOP when a symbolic link that points nowhere in the
            container is in the way, naming that link.
    """
    try:
        return open_beneath(root, path)
    except FileNotFoundError:
        pass
    parent_path, name = posixpath.split(path)
    parent = make_beneath(root, parent_path, directory=True)
    try:
        try:
            if directory:
                os.mkdir(name, 0o755, dir_fd=parent)
            else:
                # A regular file as the mount point: mknod(2) of S_IFREG
                # needs no privilege.
                os.mknod(name, 0o644 | stat.S_IFREG, dir_fd=parent)
        except FileExistsError:
            pass  # made meanwhile; or a dangling link, refused just below
        try:
            return _kernel.openat2(parent, name, os.O_PATH, _RESOLVE_HERE)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise OSError(
                errno.ELOOP,
                "a symbolic link that points nowhere in the container is in the way of a "
                "mount point",
                path,
            ) from None
    finally:
        os.close(parent)


def _is_directory(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def _attach(state: State, mount: int, target: str) -> None:
    """Attach the detached `mount` on `target` (created as its kind), beneath the root.

    Raises:
        OSError: EISDIR or ENOTDIR when `target` exists as the other kind
            (move_mount(2) would only say EINVAL).
    """
    directory = _is_directory(mount)
    where = make_beneath(state.root, target, directory=directory)
    try:
        if _is_directory(where) != directory:
            raise OSError(
                errno.ENOTDIR if directory else errno.EISDIR,
                "a file cannot be mounted on a directory, nor a directory on a file",
                target,
            )
        _mounts.move_mount(mount, where)
    finally:
        os.close(where)


def _new_file_system(
    fstype: str, source: str | None, options: tuple[tuple[str, str | None], ...], attributes: int
) -> int:
    """Return a detached mount of a new file system (fsopen, fsconfig, fsmount)."""
    context = _mounts.fsopen(fstype)
    try:
        if source is not None:
            _mounts.fsconfig(context, _mounts.FSCONFIG_SET_STRING, "source", source)
        for key, value in options:
            if value is None:
                _mounts.fsconfig(context, _mounts.FSCONFIG_SET_FLAG, key)
            else:
                _mounts.fsconfig(context, _mounts.FSCONFIG_SET_STRING, key, value)
        _mounts.fsconfig(context, _mounts.FSCONFIG_CMD_CREATE)
        return _mounts.fsmount(context, attributes)
    finally:
        os.close(context)


def make_mounts_private(state: State, step: steps.MakeMountsPrivate) -> None:
    """Make every mount of the copied namespace private (mount(2), MS_REC | MS_PRIVATE)."""
    _kernel.mount(None, "/", None, _kernel.MS_REC | _kernel.MS_PRIVATE)


def open_path(state: State, step: steps.OpenPath) -> None:
    """Open a host path O_PATH into a slot, checking the type of its file system if asked."""
    fd = os.open(step.source, os.O_PATH | os.O_CLOEXEC)
    if step.magic is not None and _kernel.fstatfs_type(fd) != step.magic:
        os.close(fd)
        raise OSError(errno.EINVAL, f"not the expected file system (0x{step.magic:x})", step.source)
    state.slots[step.slot] = fd


def clone_tree(state: State, step: steps.CloneTree) -> None:
    """Copy the host's tree at a source path into a slot, detached."""
    flags = _CLONE | (_mounts.AT_SYMLINK_NOFOLLOW if step.nofollow else 0)
    try:
        tree = _mounts.open_tree(_kernel.AT_FDCWD, step.source, flags)
    except FileNotFoundError:
        if not step.optional:
            raise
        return
    if step.nofollow and stat.S_ISLNK(os.fstat(tree).st_mode):
        os.close(tree)
        raise OSError(errno.ELOOP, "a symbolic link is not mapped here", step.source)
    state.slots[step.slot] = tree


def new_root(state: State, step: steps.NewRoot) -> None:
    """Make the new root (a tmpfs, or a copied tree) and attach it at the staging directory."""
    if step.slot is None:
        root = _new_file_system("tmpfs", "none", (("mode", step.tmpfs_mode),), 0)
    else:
        root = state.slots.pop(step.slot)
    staging = os.open(step.staging, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _mounts.move_mount(root, staging)
    except BaseException:
        os.close(root)
        raise
    finally:
        os.close(staging)
    # The fd still refers to the mount's root, now attached: every later
    # target is opened beneath it.
    state.root = root


def mount_file_system(state: State, step: steps.MountFileSystem) -> None:
    """Mount a new file system on a target beneath the root."""
    try:
        mount = _new_file_system(step.fstype, step.source, step.options, step.attributes)
    except OSError as exc:
        if exc.errno in step.tolerate:
            return
        raise
    try:
        _attach(state, mount, step.target)
    finally:
        os.close(mount)


def bind(state: State, step: steps.Bind) -> None:
    """Attach a copied tree on a target beneath the root, with its flags set first."""
    tree = state.slots.pop(step.slot, None)
    if tree is None:
        return  # an optional source this host lacks
    try:
        if step.attr_set or step.attr_clr:
            # Recursive: a read-only mapping of a tree is read-only all the
            # way down, its submounts included.
            _mounts.mount_setattr(
                tree, recursive=True, attr_set=step.attr_set, attr_clr=step.attr_clr
            )
        _attach(state, tree, step.target)
    finally:
        os.close(tree)


def set_propagation(state: State, step: steps.SetPropagation) -> None:
    """Set the propagation of the mount on a target beneath the root."""
    where = open_beneath(state.root, step.target)
    try:
        _mounts.mount_setattr(where, recursive=False, propagation=step.propagation)
    finally:
        os.close(where)


def make_link(state: State, step: steps.MakeLink) -> None:
    """Make a symbolic link beneath the root; an identical one already there is kept."""
    parent_path, name = posixpath.split(step.link)
    parent = make_beneath(state.root, parent_path, directory=True)
    try:
        try:
            os.symlink(step.target, name, dir_fd=parent)
        except FileExistsError:
            try:
                same = os.readlink(name, dir_fd=parent) == step.target
            except OSError:
                same = False
            if not same:
                raise
    finally:
        os.close(parent)


# What a cover of the host's knobs allows: reading, nothing else.
_READ_ONLY = (
    _mounts.MOUNT_ATTR_RDONLY
    | _mounts.MOUNT_ATTR_NOSUID
    | _mounts.MOUNT_ATTR_NODEV
    | _mounts.MOUNT_ATTR_NOEXEC
)


def _cover(state: State, target: str, make_cover: Callable[[int], int]) -> None:
    """Attach `make_cover(fd of target)` on `target` beneath the root; a missing target is left."""
    try:
        where = open_beneath(state.root, target)
    except FileNotFoundError:
        return
    try:
        cover = make_cover(where)
        try:
            _mounts.move_mount(cover, where)
        finally:
            os.close(cover)
    finally:
        os.close(where)


def read_only_path(state: State, step: steps.ReadOnlyPath) -> None:
    """Cover a path with a read-only, nosuid, nodev, noexec bind of itself."""

    def itself(where: int) -> int:
        tree = _mounts.open_tree(where, "", _CLONE | _mounts.AT_EMPTY_PATH)
        try:
            _mounts.mount_setattr(tree, recursive=True, attr_set=_READ_ONLY)
        except BaseException:
            os.close(tree)
            raise
        return tree

    _cover(state, step.target, itself)


def mask_path(state: State, step: steps.MaskPath) -> None:
    """Cover a directory with an empty read-only tmpfs, a file with /dev/null."""

    def nothing(where: int) -> int:
        if _is_directory(where):
            return _new_file_system("tmpfs", "none", (("mode", "0555"), ("size", "4k")), _READ_ONLY)
        # The host's /dev/null, opened before the root covered anything.
        null = state.slots[step.null_slot]
        return _mounts.open_tree(null, "", _mounts.OPEN_TREE_CLONE | _mounts.AT_EMPTY_PATH)

    _cover(state, step.target, nothing)


def pivot_root(state: State, step: steps.PivotRoot) -> None:
    """Make the new root the process's root; the old one is detached.

    pivot_root(".", "."): the old root is stacked on the new one and then
    detached, so no put_old directory is needed (pivot_root(2), NOTES).
    """
    os.fchdir(state.root)
    _kernel.pivot_root(".", ".")
    _kernel.umount2(".", _kernel.MNT_DETACH)
    os.chdir("/")
    os.close(state.root)
    state.root = -1


def write_file(state: State, step: steps.WriteFile) -> None:
    """Create a file with its content, unless something (a link too) is there already."""
    os.makedirs(posixpath.dirname(step.target), mode=0o755, exist_ok=True)
    try:
        fd = os.open(
            step.target,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            step.mode,
        )
    except FileExistsError:
        return
    try:
        os.write(fd, step.content)
    finally:
        os.close(fd)


def make_directory(state: State, step: steps.MakeDirectory) -> None:
    """Create a directory and its parents if missing."""
    os.makedirs(step.target, mode=step.mode, exist_ok=True)


def remove_path(state: State, step: steps.RemovePath) -> None:
    """Remove a file if it exists."""
    try:
        os.unlink(step.target)
    except FileNotFoundError:
        pass


def chmod(state: State, step: steps.Chmod) -> None:
    """Change a path's mode (the fresh root's, to 0755)."""
    os.chmod(step.target, step.mode)


def remount_read_only(state: State, step: steps.RemountReadOnly) -> None:
    """Make the mount at a path read-only, that mount alone (mount_setattr(2))."""
    fd = os.open(step.target, os.O_PATH | os.O_CLOEXEC)
    try:
        _mounts.mount_setattr(fd, recursive=False, attr_set=_mounts.MOUNT_ATTR_RDONLY)
    finally:
        os.close(fd)


def lock_mounts(state: State, step: steps.LockMounts) -> None:
    """Enter a further user and mount namespace so every mount becomes locked.

    Mounts copied into a mount namespace owned by a less privileged user
    namespace are locked together (mount_namespaces(7), "Restrictions on
    mount namespaces"): umount(2) of one then fails with EINVAL, and its
    flags (read-only among them) cannot be cleared, so what a mount hides
    stays hidden. The new user namespace maps only the process's own uid
    and gid, which is all an unprivileged process may map. The proc fd
    comes from before pivot_root: a container without a pid namespace has
    no /proc of its own.
    """
    proc = state.slots.pop(step.proc_slot)
    try:
        uid, gid = os.getuid(), os.getgid()
        _kernel.unshare(_kernel.CLONE_NEWUSER | _kernel.CLONE_NEWNS)
        for path, content in (
            ("self/setgroups", "deny"),
            ("self/uid_map", f"{uid} {uid} 1\n"),
            ("self/gid_map", f"{gid} {gid} 1\n"),
        ):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc)
            try:
                os.write(fd, content.encode())
            finally:
                os.close(fd)
    finally:
        os.close(proc)


RUNNERS: dict[type[steps.Step], object] = {
    steps.MakeMountsPrivate: make_mounts_private,
    steps.OpenPath: open_path,
    steps.CloneTree: clone_tree,
    steps.NewRoot: new_root,
    steps.MountFileSystem: mount_file_system,
    steps.Bind: bind,
    steps.SetPropagation: set_propagation,
    steps.MakeLink: make_link,
    steps.ReadOnlyPath: read_only_path,
    steps.MaskPath: mask_path,
    steps.PivotRoot: pivot_root,
    steps.WriteFile: write_file,
    steps.MakeDirectory: make_directory,
    steps.RemovePath: remove_path,
    steps.Chmod: chmod,
    steps.RemountReadOnly: remount_read_only,
    steps.LockMounts: lock_mounts,
}
"""The runner of each mount step."""
