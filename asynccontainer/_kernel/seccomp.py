"""libseccomp through ctypes, and the prctl(2) that installs a compiled filter.

Only the functions the library needs are bound: seccomp_init(3),
seccomp_rule_add_array(3), seccomp_syscall_resolve_name(3),
seccomp_export_bpf(3), seccomp_release(3). libseccomp is loaded when this
module is imported (in the caller, and in the fork server before any
pivot_root); `LIB` is None when it is not installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from . import prctl

__all__ = [
    "LIB",
    "SCMP_ACT_ALLOW",
    "SCMP_CMP_MASKED_EQ",
    "ArgCmp",
    "install_filter",
    "scmp_act_errno",
]

# <seccomp.h>
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
# <linux/prctl.h>, <linux/seccomp.h>
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def scmp_act_errno(number: int) -> int:
    """Return libseccomp's SCMP_ACT_ERRNO(number) action."""
    return 0x00050000 | (number & 0x0000FFFF)


class ArgCmp(ctypes.Structure):
    # struct scmp_arg_cmp
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _open_libseccomp() -> ctypes.CDLL | None:
    # The soname first: find_library runs ldconfig -p (a process, ms).
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        name = ctypes.util.find_library("seccomp")
        if name is None:
            return None  # compile_policy says what to install
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


# Loaded when the fork server imports this, not after pivot_root.
LIB = _open_libseccomp()


class _SockFprog(ctypes.Structure):
    # struct sock_fprog, <linux/filter.h>
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install_filter(program: bytes) -> None:
    """Install a compiled filter on the calling process; it holds across execve(2).

    The caller must have no_new_privs set or CAP_SYS_ADMIN in its user
    namespace (seccomp(2)); this does not set no_new_privs itself.

    Raises:
        OSError: EACCES without either; EINVAL for a malformed program.
    """
    buffer = ctypes.create_string_buffer(program, len(program))
    # struct sock_filter is 8 bytes: u16 code, u8 jt, u8 jf, u32 k.
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
