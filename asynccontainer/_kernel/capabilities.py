"""capget(2), capset(2) and the capability prctl(2) calls, for 64-bit capability sets.

Bound directly, as bubblewrap does: each is one system call with a small
structure, and libcap would be a dependency for nothing. Sets are ints,
bit N standing for capability number N (<linux/capability.h>).
"""

from __future__ import annotations

import ctypes
import os

from . import prctl

__all__ = [
    "PR_CAPBSET_DROP",
    "PR_CAPBSET_READ",
    "PR_CAP_AMBIENT",
    "PR_CAP_AMBIENT_CLEAR_ALL",
    "PR_CAP_AMBIENT_RAISE",
    "PR_SET_KEEPCAPS",
    "capget",
    "capset",
    "in_bounding_set",
]

# <linux/prctl.h>
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
# <linux/capability.h> _LINUX_CAPABILITY_VERSION_3: 64-bit sets, as two 32-bit words.
_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    # struct __user_cap_header_struct
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    # struct __user_cap_data_struct
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_libc = ctypes.CDLL(None, use_errno=True)
_libc.capget.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data)]
_libc.capset.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data)]


def capget() -> tuple[int, int, int]:
    """Return the calling thread's (effective, permitted, inheritable) sets; see capget(2).

    Raises:
        OSError: as capget(2) sets errno.
    """
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"capget: {os.strerror(error)}")

    def word(field: str) -> int:
        return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32

    return word("effective"), word("permitted"), word("inheritable")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's three sets; see capset(2).

    Raises:
        OSError: EPERM when adding to permitted, or to inheritable beyond
            the bounding set without CAP_SETPCAP.
    """
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for index in (0, 1):
        shift = 32 * index
        data[index].effective = (effective >> shift) & 0xFFFFFFFF
        data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"capset: {os.strerror(error)}")


def in_bounding_set(number: int) -> bool | None:
    """Return whether capability `number` is in the bounding set; None past the kernel's last."""
    try:
        return bool(prctl(PR_CAPBSET_READ, number))
    except OSError:
        return None  # EINVAL: the kernel knows no such capability
