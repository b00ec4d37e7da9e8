"""Guix's mount-file-systems: build the container's root and pivot into it.

Runs inside the freshly cloned container process, which is already in its
own mount namespace, and only there: nothing here may touch the host's mount
table, which is why the first step makes every mount private.

One departure from Guix, for the reason bubblewrap gives: Guix mounts the new
root on a temporary directory of the host, which someone must create and
delete. Here the new root is mounted over an existing directory (/tmp) of
the *container's* copy of the host tree. That hides the host's /tmp from the
set-up code, so every host path a mount needs is opened (O_PATH) before, and
mounted from /proc/self/fd/N. No host directory is created or left behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable

from .. import _kernel
from .._spec.filesystems import FileSystem, FileSystemMapping, MountItem, Symlink

__all__ = ["bring_loopback_up", "lock_mounts", "mount_file_systems"]

# Host directories the new root may be mounted over, best first. The mount
# only hides the directory in the container's own mount namespace.
_STAGING_CANDIDATES = ("/tmp", "/mnt", "/var/tmp", "/run")

# The device nodes bind-mounted from the host, as Guix does: a process in a
# user namespace may not mknod(2) (user_namespaces(7)). /dev/ptmx is a link
# to the container's own devpts instance instead.
_DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty", "fuse")

# statvfs(3) ST_* bits and the MS_* bits a remount must repeat: in a user
# namespace, flags of a mount inherited from a more privileged namespace are
# locked, and a remount that drops one fails with EPERM (mount(2), EPERM).
_LOCKED_STATVFS_FLAGS = (
    (os.ST_NOSUID, _kernel.MS_NOSUID),
    (os.ST_NODEV, _kernel.MS_NODEV),
    (os.ST_NOEXEC, _kernel.MS_NOEXEC),
    (os.ST_NOATIME, _kernel.MS_NOATIME),
    (os.ST_NODIRATIME, _kernel.MS_NODIRATIME),
    (os.ST_RELATIME, _kernel.MS_RELATIME),
    (os.ST_RDONLY, _kernel.MS_RDONLY),
)


def _locked_flags(path: str) -> int:
    flags = os.statvfs(path).f_flag
    bits = 0
    for st_bit, ms_bit in _LOCKED_STATVFS_FLAGS:
        if flags & st_bit:
            bits |= ms_bit
    return bits


def _remount_bind(path: str, add: int) -> None:
    """Change per-mount flags of the bind mount at `path`, keeping locked ones."""
    _kernel.mount(
        None, path, None, _kernel.MS_REMOUNT | _kernel.MS_BIND | add | _locked_flags(path)
    )


def _find_staging_directory() -> str | None:
    for candidate in _STAGING_CANDIDATES:
        if os.path.isdir(candidate) and not os.path.islink(candidate):
            return candidate
    return None


# Looked up once, when the fork server imports this, not in every container.
_STAGING = _find_staging_directory()


def _staging_directory() -> str:
    if _STAGING is not None:
        return _STAGING
    raise FileNotFoundError(
        errno.ENOENT,
        "no directory to mount the container's root on; create /tmp on the host",
        _STAGING_CANDIDATES[0],
    )


def _touch(path: str, mode: int = 0o644) -> None:
    if not os.path.lexists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode))


def _open_source(path: str) -> int:
    """Open a host path for a later bind mount; ENOENT names the user's path."""
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def _bind_mount(source_fd: int, target: str, *, read_only: bool, extra: int = 0) -> None:
    # MS_REC: in a user namespace a non-recursive bind of a tree holding
    # locked submounts is refused with EINVAL (it would reveal what they hide).
    _kernel.mount(f"/proc/self/fd/{source_fd}", target, None, _kernel.MS_BIND | _kernel.MS_REC)
    # MS_BIND ignores every other flag on the first call; they take effect
    # only through a remount (mount(2), "Creating a bind mount").
    add = extra | (_kernel.MS_RDONLY if read_only else 0)
    if add:
        _remount_bind(target, add)


def _mount_dev(root: str, stdin_tty: str | None) -> None:
    dev = f"{root}/dev"
    os.makedirs(dev, mode=0o755, exist_ok=True)
    _kernel.mount(
        "none",
        dev,
        "tmpfs",
        _kernel.MS_NOSUID | _kernel.MS_NOEXEC | _kernel.MS_STRICTATIME,
        "mode=755",
    )
    for node in _DEVICE_NODES:
        target = f"{dev}/{node}"
        # A regular file as the mount point, made in one call: mknod(2)
        # needs no privilege for S_IFREG.
        os.mknod(target, 0o666 | stat.S_IFREG)
        try:
            # The host's /dev stays in reach during set-up (only /tmp is
            # covered), and a device node has no submounts to carry along.
            _kernel.mount(f"/dev/{node}", target, None, _kernel.MS_BIND)
        except FileNotFoundError:
            os.unlink(target)  # this host has no such device
    os.mkdir(f"{dev}/pts", 0o755)
    # A private devpts instance, so the container sees only its own
    # terminals (Documentation/filesystems/devpts.rst).
    _kernel.mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        _kernel.MS_NOSUID | _kernel.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    if stdin_tty is not None:
        console = f"{dev}/console"
        _touch(console, 0o600)
        fd = _open_source(stdin_tty)
        try:
            _bind_mount(fd, console, read_only=False)
        finally:
            os.close(fd)
    os.symlink("/proc/self/fd", f"{dev}/fd")
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{number}", f"{dev}/{name}")


def _mount_item(root: str, item: FileSystem | Symlink, source_fd: int | None) -> None:
    if isinstance(item, Symlink):
        path = root + item.path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not (os.path.islink(path) and os.readlink(path) == item.target):
            os.symlink(item.target, path)
        return
    target = root + item.mount_point
    if source_fd is not None:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if stat.S_ISDIR(os.fstat(source_fd).st_mode):
            os.makedirs(target, exist_ok=True)
        else:
            _touch(target)
        extra = item.mount_flags() & ~(_kernel.MS_BIND | _kernel.MS_RDONLY)
        _bind_mount(source_fd, target, read_only="read-only" in item.flags, extra=extra)
    else:
        os.makedirs(target, exist_ok=True)
        _kernel.mount(item.device, target, item.type, item.mount_flags(), item.options)
    propagation = item.propagation_flags()
    if propagation:
        _kernel.mount(None, target, None, propagation)


def mount_file_systems(
    *,
    root: str | None,
    mounts: Iterable[MountItem],
    namespaces: frozenset[str],
    writable_root: bool,
    populate: Callable[[], object] | None,
    write_hosts: bool,
) -> None:
    """Build the container's file system tree and make it the process's root.

    The steps are Guix's (see docs/design.md): everything private; a tmpfs
    (or `root`, bind-mounted) as the new root; /proc with a pid namespace;
    /sys with a net namespace; /dev and its nodes, devpts, the console, the
    fd links; the user's mounts in order; pivot_root and a detach of the old
    root; `populate`; chmod 0755; read-only unless `writable_root`.

    Raises:
        OSError: the first failing step's error; host paths that do not
            exist raise FileNotFoundError naming the path as the user gave it.
    """
    # Step 1. Without it pivot_root fails with EINVAL on hosts whose / is
    # shared (systemd's default), and mounts below would propagate out.
    _kernel.mount(None, "/", None, _kernel.MS_REC | _kernel.MS_PRIVATE)

    file_systems: list[FileSystem | Symlink] = [
        item.to_bind_mount() if isinstance(item, FileSystemMapping) else item for item in mounts
    ]
    # Every host path is opened before anything is mounted over /tmp.
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if root is not None else None
    source_fds: list[int | None] = [
        _open_source(item.device) if isinstance(item, FileSystem) and item.is_bind_mount else None
        for item in file_systems
    ]
    stdin_tty = os.ttyname(0) if os.isatty(0) else None

    new_root = _staging_directory()
    if root_fd is None:
        _kernel.mount("none", new_root, "tmpfs", 0, "mode=0755")
    else:
        _kernel.mount(f"/proc/self/fd/{root_fd}", new_root, None, _kernel.MS_BIND | _kernel.MS_REC)
        os.close(root_fd)

    if "pid" in namespaces:
        # A proc instance shows the pid namespace it is mounted from, so it
        # needs one of the container's own.
        os.makedirs(f"{new_root}/proc", exist_ok=True)
        _kernel.mount(
            "proc",
            f"{new_root}/proc",
            "proc",
            _kernel.MS_NOSUID | _kernel.MS_NODEV | _kernel.MS_NOEXEC,
        )
    if "net" in namespaces:
        os.makedirs(f"{new_root}/sys", exist_ok=True)
        try:
            # sysfs wants CAP_SYS_ADMIN over the current net namespace.
            _kernel.mount(
                "sysfs",
                f"{new_root}/sys",
                "sysfs",
                _kernel.MS_NOSUID | _kernel.MS_NODEV | _kernel.MS_NOEXEC | _kernel.MS_RDONLY,
            )
        except PermissionError:
            pass
    _mount_dev(new_root, stdin_tty)

    for item, source_fd in zip(file_systems, source_fds, strict=True):
        try:
            _mount_item(new_root, item, source_fd)
        finally:
            if source_fd is not None:
                os.close(source_fd)

    # pivot_root(".", "."): the old root is stacked on the new one and then
    # detached, so no put_old directory is needed (pivot_root(2), NOTES).
    os.chdir(new_root)
    _kernel.pivot_root(".", ".")
    _kernel.umount2(".", _kernel.MNT_DETACH)
    os.chdir("/")

    if write_hosts and root is None and not os.path.lexists("/etc/hosts"):
        os.makedirs("/etc", mode=0o755, exist_ok=True)
        with open("/etc/hosts", "w") as hosts:
            hosts.write("127.0.0.1 localhost\n::1 localhost\n")
    if populate is not None:
        populate()
    if root is None:
        os.chmod("/", 0o755)
    if not writable_root:
        _remount_bind("/", _kernel.MS_RDONLY)


# <linux/sockios.h>, <net/if.h>
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sh22x")


def bring_loopback_up() -> None:
    """Set the IFF_UP flag of `lo` in the current network namespace.

    A new network namespace starts with its loopback device down
    (network_namespaces(7)), so that 127.0.0.1 is unreachable until then.

    Raises:
        OSError: EPERM without CAP_NET_ADMIN in the namespace.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ.pack(b"lo", 0)
        flags = _IFREQ.unpack(fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def lock_mounts(proc_fd: int) -> None:
    """Enter a further user and mount namespace so every mount becomes locked.

    Mounts copied into a mount namespace owned by a less privileged user
    namespace are locked together (mount_namespaces(7), "Restrictions on
    mount namespaces"): umount(2) of one then fails with EINVAL, so what a
    mount hides stays hidden. The new user namespace maps only the process's
    own uid and gid, which is all an unprivileged process may map.

    `proc_fd` is a directory fd of a proc mount opened before pivot_root: a
    container without a pid namespace has no /proc of its own.

    Raises:
        OSError: as unshare(2) or the id map writes fail.
    """
    uid, gid = os.getuid(), os.getgid()
    _kernel.unshare(_kernel.CLONE_NEWUSER | _kernel.CLONE_NEWNS)
    for path, content in (
        ("self/setgroups", "deny"),
        ("self/uid_map", f"{uid} {uid} 1\n"),
        ("self/gid_map", f"{gid} {gid} 1\n"),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc_fd)
        try:
            os.write(fd, content.encode())
        finally:
            os.close(fd)
