"""The kernel edge: thin ctypes bindings for the system calls Python 3.11 lacks.

Every function here does one system call and nothing else: no policy, no
retries, no defaults beyond the kernel's. A failing call raises `OSError` (the
subclass the errno selects, such as `FileNotFoundError`) whose message names
the call, so that an error surfacing far away still says which step failed.

Where the standard library already has the call it is used instead:
`os.pidfd_open` (3.9), `signal.pidfd_send_signal` (3.9), `socket.sethostname`
(3.3). Python 3.12 adds `os.unshare` and `os.setns`; until 3.11 support is
dropped we bind them here.

Constants are named after the kernel's and carry the header they come from.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import sys

__all__ = [
    "AT_FDCWD",
    "CLONE_INTO_CGROUP",
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_STRICTATIME",
    "PROC_SUPER_MAGIC",
    "SCM_MAX_FD",
    "clone",
    "fstatfs_type",
    "inotify_add_watch",
    "inotify_init1",
    "inotify_rm_watch",
    "mount",
    "openat2",
    "pidfd_exit_status",
    "pidfd_open",
    "pidfd_send_signal",
    "pivot_root",
    "prctl",
    "set_process_name",
    "sethostname",
    "setns",
    "umount2",
    "unshare",
]

# <net/scm.h>: the most fds one SCM_RIGHTS message carries.
SCM_MAX_FD = 253

# <linux/sched.h>
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000

# <linux/mount.h> (MS_* mount flags, MNT_* umount2 flags)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4
UMOUNT_NOFOLLOW = 8

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36

# <linux/fcntl.h>: the dirfd that means the working directory.
AT_FDCWD = -100

# <linux/openat2.h>
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# <sys/inotify.h>
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# <asm/unistd_64.h> and <asm-generic/unistd.h>: the calls glibc has no wrapper
# for (pivot_root) or whose wrapper we must not use (clone: glibc's wrapper
# wants a function and a separate stack; we want fork semantics).
_SYSCALL_NUMBERS = {
    "x86_64": {"clone": 56, "pivot_root": 155, "clone3": 435, "openat2": 437},
    "aarch64": {"clone": 220, "pivot_root": 41, "clone3": 435, "openat2": 437},
}

# use_errno: read errno right after the call, before Python can clobber it.
# dlopen(NULL) is the program's own namespace, libc included (dlopen(3)):
# ctypes.util.find_library would run ldconfig -p, 24 ms at a process start.
_libc = ctypes.CDLL(None, use_errno=True)
# A PyDLL keeps the GIL held during the call. clone() must run with the GIL
# held: the child starts with a copy of this thread holding it, which is the
# state the interpreter's after-fork hook expects (BenchExec's container.py
# documents the deadlocks seen otherwise).
_libc_gil = ctypes.PyDLL(None, use_errno=True)

_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long
_libc_gil.syscall.restype = ctypes.c_long


def _syscall_number(name: str) -> int:
    machine = os.uname().machine
    try:
        return _SYSCALL_NUMBERS[machine][name]
    except KeyError:
        raise OSError(0, f"{name}: no system call number known for machine {machine!r}") from None


def _fsencode(path: str | bytes | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def _check(result: int, call: str, filename: object = None) -> int:
    """Raise the OSError for errno when a libc call returned -1."""
    if result == -1:
        err = ctypes.get_errno()
        message = f"{call}: {os.strerror(err)}"
        if filename is None:
            raise OSError(err, message)
        raise OSError(err, message, filename)
    return result


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces; see unshare(2).

    Raises:
        OSError: EINVAL when the process is multi-threaded and CLONE_NEWUSER
            is asked, EPERM without the privilege, ENOSPC past a limit in
            /proc/sys/user/max_*_namespaces.
    """
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace that `fd` (an open /proc/PID/ns/* file) refers to; see setns(2).

    Raises:
        OSError: EPERM without CAP_SYS_ADMIN in the namespace's owner, EINVAL
            when joining a user namespace from a multi-threaded process or
            joining one's own user namespace.
    """
    _check(_libc.setns(fd, nstype), "setns")


def mount(
    source: str | bytes | os.PathLike[str] | None,
    target: str | bytes | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """Mount a file system; see mount(2). The target names the error.

    Raises:
        OSError: as mount(2) sets errno (ENOENT, EPERM, EINVAL ...).
    """
    _check(
        _libc.mount(
            _fsencode(source),
            _fsencode(target),
            None if fstype is None else fstype.encode(),
            flags,
            None if data is None else data.encode(),
        ),
        "mount",
        os.fsdecode(target),
    )


def umount2(target: str | bytes | os.PathLike[str], flags: int = 0) -> None:
    """Unmount the file system at `target`; see umount2(2).

    Raises:
        OSError: EINVAL for a locked mount or one that is not a mount point,
            EBUSY while in use (without MNT_DETACH).
    """
    _check(_libc.umount2(_fsencode(target), flags), "umount2", os.fsdecode(target))


def pivot_root(new_root: str | os.PathLike[str], put_old: str | os.PathLike[str]) -> None:
    """Make `new_root` the root mount, the old one stacked at `put_old`; see pivot_root(2).

    Raises:
        OSError: EINVAL when new_root is not a mount point, the current root
            is shared, or put_old is not under new_root; EBUSY when either is
            the current root in a way the kernel refuses.
    """
    number = _syscall_number("pivot_root")
    _check(
        _libc.syscall(
            ctypes.c_long(number),
            ctypes.c_char_p(os.fsencode(new_root)),
            ctypes.c_char_p(os.fsencode(put_old)),
        ),
        "pivot_root",
        os.fsdecode(new_root),
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """Operate on the calling process; see prctl(2). Returns prctl's result.

    Raises:
        OSError: as prctl(2) sets errno (EINVAL for an unknown option).
    """
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), "prctl")


class _OpenHow(ctypes.Structure):
    # struct open_how, <linux/openat2.h>
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """Open `path` relative to `dir_fd` under the RESOLVE_* rules; see openat2(2).

    With RESOLVE_IN_ROOT, `dir_fd` acts as the root for the lookup: ".."
    and absolute symlinks stay inside it, as they would for a process whose
    root it is (Linux 5.6).

    Raises:
        OSError: as openat2(2) sets errno (ENOENT, EXDEV when a rule is
            broken, ENOSYS before Linux 5.6).
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(
        _libc.syscall(
            ctypes.c_long(_syscall_number("openat2")),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        ),
        "openat2",
        path,
    )


def inotify_init1(flags: int = IN_NONBLOCK | IN_CLOEXEC) -> int:
    """Return a new inotify instance's fd; see inotify_init1(2).

    Raises:
        OSError: EMFILE past /proc/sys/fs/inotify/max_user_instances.
    """
    return _check(_libc.inotify_init1(flags), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """Watch `path` for the events in `mask`; return the watch descriptor.

    Raises:
        OSError: ENOENT when the path does not exist, ENOSPC past
            /proc/sys/fs/inotify/max_user_watches.
    """
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask), "inotify_add_watch", path)


# <linux/magic.h>
PROC_SUPER_MAGIC = 0x9FA0


def fstatfs_type(fd: int) -> int:
    """Return the file system type (f_type, a *_SUPER_MAGIC) of what `fd` is on; see statfs(2).

    Raises:
        OSError: as fstatfs(2) sets errno.
    """
    # struct statfs begins with its f_type (__fsword_t, a long); 120 bytes
    # hold the whole structure on 64-bit machines.
    buffer = (ctypes.c_long * 16)()
    _check(_libc.fstatfs(fd, buffer), "fstatfs")
    return int(buffer[0]) & 0xFFFFFFFF


def inotify_rm_watch(fd: int, wd: int) -> None:
    """Remove the watch `wd`; see inotify_rm_watch(2).

    Raises:
        OSError: EINVAL when the watch is gone already.
    """
    _check(_libc.inotify_rm_watch(fd, wd), "inotify_rm_watch")


def set_process_name(name: str) -> None:
    """Set the calling thread's name (/proc/PID/comm, 15 bytes at most); see PR_SET_NAME.

    Raises:
        OSError: as prctl(2) sets errno.
    """
    buffer = ctypes.create_string_buffer(name.encode()[:15])
    prctl(PR_SET_NAME, ctypes.addressof(buffer))


class _CloneArgs(ctypes.Structure):
    """struct clone_args of clone3(2), up to its `cgroup` field (CLONE_ARGS_SIZE_VER2)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


CLONE_INTO_CGROUP = 0x200000000
_CSIGNAL = 0xFF


def clone(flags: int, cgroup_fd: int | None = None) -> int:
    """Fork the calling process with extra clone flags; see clone(2).

    It behaves as fork(): with no new stack the child continues from this
    call on a copy of the caller's memory, and it returns 0 in the child and
    the child's PID in the parent. `flags` should include the exit signal
    (usually SIGCHLD). Unlike `os.fork`, the CLONE_NEWPID and CLONE_NEWUSER
    flags apply to the child itself, so it can be PID 1 of a new namespace.

    With `cgroup_fd` (a v2 cgroup's directory), the child starts in that
    cgroup (clone3(2), CLONE_INTO_CGROUP, Linux 5.7): it never runs outside
    it, and it costs a fraction of a move through cgroup.procs, which waits
    for an RCU grace period (cgroup_threadgroup_rwsem) on every write.

    The interpreter's own fork hooks (PyOS_BeforeFork and the two
    PyOS_AfterFork_* calls, as `os.fork` does them) are run around the
    system call; the caller must be single-threaded.

    Raises:
        OSError: EPERM, EINVAL, ENOSPC (namespace limits), ENOMEM, EUSERS;
            with `cgroup_fd`, EBADF or EOPNOTSUPP for what is not a v2
            cgroup, EBUSY for one with controllers in the way.
    """
    if cgroup_fd is None:
        arguments: tuple[object, ...] = (
            ctypes.c_long(_syscall_number("clone")),
            ctypes.c_ulong(flags),
            # x86_64: clone(flags, stack, parent_tid, child_tid, tls);
            # aarch64 swaps the last two. With all of them zero, the order
            # is moot.
            *[ctypes.c_void_p(0)] * 4,
        )
    else:
        clone_args = _CloneArgs(
            flags=(flags & ~_CSIGNAL) | CLONE_INTO_CGROUP,
            exit_signal=flags & _CSIGNAL,
            cgroup=cgroup_fd,
        )
        # A zero stack and stack size: the child runs on a copy of this
        # stack, as with fork (clone3(2)).
        arguments = (
            ctypes.c_long(_syscall_number("clone3")),
            ctypes.byref(clone_args),
            ctypes.c_size_t(ctypes.sizeof(clone_args)),
        )
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = _libc_gil.syscall(*arguments)
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"{'clone' if cgroup_fd is None else 'clone3'}: {os.strerror(err)}")
    return int(pid)


def pidfd_open(pid: int) -> int:
    """Return a new pidfd (close-on-exec) for the process `pid`; see pidfd_open(2).

    Raises:
        ProcessLookupError: when no such process exists.
    """
    return os.pidfd_open(pid)


# PIDFD_GET_INFO: _IOWR(0xFF, 11, struct pidfd_info), its first 64-byte
# version (include/uapi/linux/pidfd.h); PIDFD_INFO_EXIT asks for exit_code,
# at offset 60 there, the wait(2) status (Linux 6.15).
_PIDFD_GET_INFO = 0xC040FF0B
_PIDFD_INFO_EXIT = 1 << 3


def pidfd_exit_status(pidfd: int) -> int | None:
    """Return the wait(2) status of the exited and reaped process of a pidfd; else None.

    Works for any process, not only a child: the kernel keeps the status
    for every pidfd open when the process was reaped. None while it runs
    or awaits its reaping, and on kernels before 6.15, which lack
    PIDFD_INFO_EXIT.
    """
    info = bytearray(64)
    info[:8] = _PIDFD_INFO_EXIT.to_bytes(8, sys.byteorder)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, info)
    except OSError:
        return None  # ENOTTY or EINVAL: an older kernel; ESRCH: not reaped yet
    mask = int.from_bytes(info[:8], sys.byteorder)
    if not mask & _PIDFD_INFO_EXIT:
        return None
    return int.from_bytes(info[60:64], sys.byteorder, signed=True)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Send `sig` to the process the pidfd refers to; see pidfd_send_signal(2).

    A pidfd cannot refer to a recycled PID, which is what makes signals race-free.

    Raises:
        ProcessLookupError: when the process has already exited.
    """
    signal.pidfd_send_signal(pidfd, sig)


def sethostname(name: str) -> None:
    """Set the host name of the calling process's UTS namespace; see sethostname(2).

    Raises:
        PermissionError: without CAP_SYS_ADMIN in the UTS namespace's owner.
    """
    socket.sethostname(name)
