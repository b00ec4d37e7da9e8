"""The new mount API: mounts made, changed and moved through file descriptors.

open_tree(2), move_mount(2), fsopen(2), fsconfig(2), fsmount(2) (Linux 5.2)
and mount_setattr(2) (Linux 5.12). With them no mount needs a path lookup
at the moment it is made: a file system is created detached (fsmount), a
tree is copied detached (open_tree with OPEN_TREE_CLONE), its flags are set
on the fd (mount_setattr), and it is attached onto a target fd opened
beforehand (move_mount with MOVE_MOUNT_T_EMPTY_PATH). That closes the race
of CVE-2021-30465, where a path checked and then mounted on was swapped for
a symbolic link in between.

The system call numbers are the same on every architecture: these calls
came after the tables were unified (<asm-generic/unistd.h>).
"""

from __future__ import annotations

import ctypes
import os

from . import _check, _libc

__all__ = [
    "AT_EMPTY_PATH",
    "AT_RECURSIVE",
    "FSCONFIG_CMD_CREATE",
    "FSCONFIG_SET_FLAG",
    "FSCONFIG_SET_STRING",
    "MOUNT_ATTR_NOATIME",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NODIRATIME",
    "MOUNT_ATTR_NOEXEC",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_RDONLY",
    "MOUNT_ATTR_RELATIME",
    "MOUNT_ATTR_STRICTATIME",
    "MOUNT_ATTR__ATIME",
    "fsconfig",
    "fsmount",
    "fsopen",
    "mount_setattr",
    "move_mount",
    "open_tree",
]

# <linux/fcntl.h>
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
# <linux/mount.h>
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_NOEXEC = 0x00000008
MOUNT_ATTR__ATIME = 0x00000070
MOUNT_ATTR_RELATIME = 0x00000000
MOUNT_ATTR_NOATIME = 0x00000010
MOUNT_ATTR_STRICTATIME = 0x00000020
MOUNT_ATTR_NODIRATIME = 0x00000080

_OPEN_TREE = 428
_MOVE_MOUNT = 429
_FSOPEN = 430
_FSCONFIG = 431
_FSMOUNT = 432
_MOUNT_SETATTR = 442


class _MountAttr(ctypes.Structure):
    # struct mount_attr, <linux/mount.h> (MOUNT_ATTR_SIZE_VER0)
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _syscall(number: int, call: str, *arguments: object) -> int:
    return _check(_libc.syscall(ctypes.c_long(number), *arguments), call)


def _path(path: str) -> ctypes.c_char_p:
    return ctypes.c_char_p(os.fsencode(path))


def open_tree(dir_fd: int, path: str, flags: int) -> int:
    """Return an O_PATH fd of the mount at `path`, or of a detached copy with OPEN_TREE_CLONE.

    The fd is close-on-exec. With OPEN_TREE_CLONE | AT_RECURSIVE the copy
    holds the submounts too (in a user namespace a copy without them is
    refused when they are locked, as they would reveal what they hide).

    Raises:
        OSError: ENOENT, EPERM, EINVAL as open_tree(2) sets them.
    """
    return _syscall(
        _OPEN_TREE,
        "open_tree",
        ctypes.c_int(dir_fd),
        _path(path),
        ctypes.c_uint(flags | os.O_CLOEXEC),
    )


def move_mount(from_fd: int, to_fd: int) -> None:
    """Attach the mount `from_fd` (from open_tree or fsmount) onto the directory or file `to_fd`.

    Both are fds, not paths (MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH):
    the mount lands on exactly what `to_fd` was opened on.

    Raises:
        OSError: EINVAL when the target is not in this mount namespace
            (before Linux 6.15, a detached tree), ENOTDIR for a directory
            mounted on a file or the other way round.
    """
    _syscall(
        _MOVE_MOUNT,
        "move_mount",
        ctypes.c_int(from_fd),
        _path(""),
        ctypes.c_int(to_fd),
        _path(""),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )


def fsopen(fstype: str) -> int:
    """Return a file system context fd for `fstype` ("tmpfs", "proc" ...); close-on-exec.

    Raises:
        OSError: ENODEV for a type the kernel does not know, EPERM without
            CAP_SYS_ADMIN over the namespace the type needs.
    """
    return _syscall(
        _FSOPEN, "fsopen", ctypes.c_char_p(fstype.encode()), ctypes.c_uint(FSOPEN_CLOEXEC)
    )


def fsconfig(fd: int, command: int, key: str | None = None, value: str | None = None) -> None:
    """Set one parameter of a file system context, or create it (FSCONFIG_CMD_CREATE).

    Raises:
        OSError: EINVAL for a parameter the file system refuses (its
            reason is logged in the context, not returned).
    """
    _syscall(
        _FSCONFIG,
        "fsconfig",
        ctypes.c_int(fd),
        ctypes.c_uint(command),
        None if key is None else ctypes.c_char_p(key.encode()),
        None if value is None else ctypes.c_char_p(value.encode()),
        ctypes.c_int(0),
    )


def fsmount(fd: int, attributes: int) -> int:
    """Return a detached mount (an O_PATH fd, close-on-exec) of a created context.

    Raises:
        OSError: as fsmount(2) sets errno.
    """
    return _syscall(
        _FSMOUNT,
        "fsmount",
        ctypes.c_int(fd),
        ctypes.c_uint(FSMOUNT_CLOEXEC),
        ctypes.c_uint(attributes),
    )


def mount_setattr(
    fd: int, *, recursive: bool, attr_set: int = 0, attr_clr: int = 0, propagation: int = 0
) -> None:
    """Change the flags (MOUNT_ATTR_*) or the propagation (MS_*) of the mount `fd` is on.

    With `recursive`, every mount below it changes too (AT_RECURSIVE).

    Raises:
        OSError: EPERM to clear a flag that is locked (inherited from a
            more privileged mount namespace), ENOSYS before Linux 5.12.
    """
    attributes = _MountAttr(attr_set, attr_clr, propagation, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _syscall(
        _MOUNT_SETATTR,
        "mount_setattr",
        ctypes.c_int(fd),
        _path(""),
        ctypes.c_uint(flags),
        ctypes.byref(attributes),
        ctypes.c_size_t(ctypes.sizeof(attributes)),
    )
