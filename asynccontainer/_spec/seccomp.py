"""Seccomp filters: the policy value and its compilation to BPF with libseccomp.

libseccomp compiles the rules to BPF, with the architecture check and the
system call numbers (bound in `_kernel.seccomp`). The program is compiled
once per policy in the caller, and the container installs the bytes with
prctl(2).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Iterable

import attrs

from .._kernel import seccomp as _libseccomp
from .._kernel.seccomp import LIB as _LIB

__all__ = ["DEFAULT_SECCOMP", "SeccompPolicy", "compile_policy"]

# <linux/sched.h>
_CLONE_NEWUSER = 0x10000000

# What no container needs, and what kernel exploits keep reaching for:
# the kernel keyring (not namespaced: keys leak across containers),
# userfaultfd (a staple of use-after-free exploits), kexec and modules,
# open_by_handle_at (the "shocker" escape from Docker, 2014), perf events
# and bpf (large attack surface), and other host-wide switches.
_DEFAULT_DENIED = frozenset(
    {
        "keyctl",
        "add_key",
        "request_key",
        "userfaultfd",
        "kexec_load",
        "kexec_file_load",
        "open_by_handle_at",
        "perf_event_open",
        "bpf",
        "init_module",
        "finit_module",
        "delete_module",
        "swapon",
        "swapoff",
        "reboot",
        "acct",
        "settimeofday",
        "clock_settime",
        "clock_adjtime",
        "adjtimex",
        "lookup_dcookie",
        # io_uring does on its own what a filter sees as system calls, and
        # keeps giving privilege escalations; Docker's default refuses it.
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
    }
)

# <asm-generic/ioctls.h>: pushing input into a terminal, and the Linux
# console's selection paste (CVE-2023-1523 class): a container holding a
# terminal of the caller's could type into its shell.
_IOCTLS = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}
_DEFAULT_IOCTLS = frozenset(_IOCTLS)


def _syscall_names(names: Iterable[str]) -> frozenset[str]:
    if isinstance(names, str):
        raise TypeError(f"give system call names as a set, not the string {names!r}")
    result = frozenset(names)
    if _LIB is None:
        return result  # checked when loaded, where the missing library is reported
    unknown = sorted(
        name
        for name in result
        if not isinstance(name, str) or _LIB.seccomp_syscall_resolve_name(name.encode()) < 0
    )
    if unknown:
        raise ValueError(
            f"unknown system call name(s) {', '.join(map(repr, unknown))} for this "
            "architecture (libseccomp's names, as in seccomp_syscall_resolve_name(3))"
        )
    return result


def _ioctl_names(names: Iterable[str]) -> frozenset[str]:
    if isinstance(names, str):
        raise TypeError(f"give ioctl names as a set, not the string {names!r}")
    result = frozenset(names)
    unknown = sorted(map(repr, result - set(_IOCTLS)))
    if unknown:
        raise ValueError(
            f"unknown ioctl(s) {', '.join(unknown)}; the filter knows {', '.join(sorted(_IOCTLS))}"
        )
    return result


@attrs.frozen
class SeccompPolicy:
    """A seccomp filter for a container's target: what it may not call.

    Every system call is allowed but those in `deny`, which fail with
    `errno` (EPERM by default: programs take it as "not allowed" and carry
    on). With `allow_user_namespaces=False`, creating a user namespace
    fails too (unshare and clone with CLONE_NEWUSER, with EPERM; clone3,
    whose flags a filter cannot read, with ENOSYS so that libc falls back
    to clone). A policy is compose-able: ``SeccompPolicy(deny=
    DEFAULT_SECCOMP.deny | {"mount"})``.

    `deny_ioctls` names the terminal ioctls refused with EPERM: TIOCSTI
    (pushing keystrokes into a terminal) and TIOCLINUX by default, compared
    on the request's low 32 bits, as the kernel reads it (CVE-2019-10063).

    `deny_setuid_files` keeps the container from making files that grant
    privilege to whoever runs them: chmod and its kin, open, creat and
    mknod fail with EPERM when the mode has the setuid or setgid bit, and
    openat2 (whose mode a filter cannot read) and io_uring (which opens
    files without system calls a filter sees) with ENOSYS, so that
    programs fall back to what is filtered. None, the default, denies
    them when the caller is root: its container's files are then root's
    on the host, and a setuid program left in a writable mapping would
    make any host user root. True denies them always, False never.

    Raises:
        ValueError: for a system call name libseccomp does not know.
    """

    deny: frozenset[str] = attrs.field(default=_DEFAULT_DENIED, converter=_syscall_names)
    errno: int = attrs.field(default=errno.EPERM, validator=attrs.validators.instance_of(int))
    allow_user_namespaces: bool = attrs.field(
        default=True, validator=attrs.validators.instance_of(bool)
    )
    deny_setuid_files: bool | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(bool))
    )
    deny_ioctls: frozenset[str] = attrs.field(default=_DEFAULT_IOCTLS, converter=_ioctl_names)


DEFAULT_SECCOMP = SeccompPolicy()
"""The default filter: keyring, userfaultfd, kexec, modules, open_by_handle_at,
perf_event_open, bpf, io_uring, swap, reboot, accounting and clock changes fail
with EPERM, and so do the TIOCSTI and TIOCLINUX ioctls; for a root caller, so
does giving a file the setuid or setgid bit."""

# <sys/stat.h>
_S_ISUID = 0o4000
_S_ISGID = 0o2000
# The system calls that give a file its mode, and which argument the mode is.
_MODE_ARGUMENT = {
    "chmod": 1,
    "fchmod": 1,
    "fchmodat": 2,
    "fchmodat2": 2,
    "creat": 1,
    "open": 2,
    "openat": 3,
    "mknod": 1,
    "mknodat": 2,
}
# What a filter cannot see into: a mode in a structure, or no system call at all.
_OPAQUE = ("openat2", "io_uring_setup", "io_uring_enter", "io_uring_register")
_LOW_32_BITS = 0xFFFFFFFF
# <asm-generic/unistd.h>: calls newer than some libseccomp releases; the
# numbers are the same on every architecture.
_NEW_SYSCALLS = {"fchmodat2": 452}


def _number(lib: ctypes.CDLL, name: str) -> int:
    number = int(lib.seccomp_syscall_resolve_name(name.encode()))
    return _NEW_SYSCALLS.get(name, number) if number < 0 else number


def _ioctl_rules(lib: ctypes.CDLL, context: int, names: frozenset[str]) -> None:
    denied = _libseccomp.scmp_act_errno(errno.EPERM)
    for name in sorted(names):
        request = _libseccomp.ArgCmp(1, _libseccomp.SCMP_CMP_MASKED_EQ, _LOW_32_BITS, _IOCTLS[name])
        _rule(lib, context, denied, "ioctl", [request])


def _setuid_rules(lib: ctypes.CDLL, context: int, already: frozenset[str]) -> None:
    denied = _libseccomp.scmp_act_errno(errno.EPERM)
    for name, argument in _MODE_ARGUMENT.items():
        if _number(lib, name) < 0:
            continue  # not a system call of this architecture (open on aarch64)
        for bit in (_S_ISUID, _S_ISGID):
            comparison = _libseccomp.ArgCmp(argument, _libseccomp.SCMP_CMP_MASKED_EQ, bit, bit)
            _rule(lib, context, denied, name, [comparison])
    for name in _OPAQUE:
        if name not in already:  # refused already by the policy's deny list
            _rule(lib, context, _libseccomp.scmp_act_errno(errno.ENOSYS), name, [])


def _rule(
    lib: ctypes.CDLL, context: int, action: int, name: str, comparisons: list[_libseccomp.ArgCmp]
) -> None:
    number = _number(lib, name)
    array = (_libseccomp.ArgCmp * len(comparisons))(*comparisons) if comparisons else None
    result = lib.seccomp_rule_add_array(context, action, number, len(comparisons), array)
    if result < 0:
        raise OSError(-result, f"seccomp_rule_add({name}): {errno.errorcode.get(-result, '')}")


@functools.lru_cache(maxsize=32)
def compile_policy(policy: SeccompPolicy, *, deny_setuid_files: bool) -> bytes:
    """Return the BPF program of `policy` (struct sock_filter entries), compiled once.

    libseccomp builds it in the caller (seccomp_export_bpf(3)) and every
    container installs the same bytes with one prctl: building it in each
    container cost 1.5 ms per start. `deny_setuid_files` is the policy's
    field as the caller decided it (None resolved).

    Raises:
        OSError: when libseccomp is missing or cannot build the filter.
    """
    lib = _LIB
    if lib is None:
        raise OSError(
            errno.ENOSYS,
            "libseccomp is not installed (libseccomp2 on Debian); install it, or pass "
            "seccomp=None to run without a filter",
        )
    context = lib.seccomp_init(_libseccomp.SCMP_ACT_ALLOW)
    if not context:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        denied = _libseccomp.scmp_act_errno(policy.errno)
        for name in sorted(policy.deny):
            _rule(lib, context, denied, name, [])
        if not policy.allow_user_namespaces:
            new_user = _libseccomp.ArgCmp(
                0, _libseccomp.SCMP_CMP_MASKED_EQ, _CLONE_NEWUSER, _CLONE_NEWUSER
            )
            _rule(lib, context, _libseccomp.scmp_act_errno(errno.EPERM), "unshare", [new_user])
            _rule(lib, context, _libseccomp.scmp_act_errno(errno.EPERM), "clone", [new_user])
            _rule(lib, context, _libseccomp.scmp_act_errno(errno.ENOSYS), "clone3", [])
        _ioctl_rules(lib, context, policy.deny_ioctls)
        if deny_setuid_files:
            _setuid_rules(lib, context, policy.deny)
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            result = lib.seccomp_export_bpf(context, fd)
            if result < 0:
                raise OSError(-result, "seccomp_export_bpf")
            size = os.lseek(fd, 0, os.SEEK_END)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(context)
