"""Capabilities the target keeps: names, their check, and the drop in the container.

A process that is root in its own user namespace holds every capability
there (user_namespaces(7)). Most targets need few of them, and each one
kept is kernel surface a hostile target can reach: CAP_SYS_ADMIN alone
lets it mount, make namespaces and use many ioctls. The container keeps
only the set asked for, in all five sets at once (capabilities(7)):

- bounding: dropped first (PR_CAPBSET_DROP needs CAP_SETPCAP, which is
  given up last), so no execve can bring a capability back;
- permitted, effective and inheritable: set with capset(2);
- ambient: the kept set, so that a target that is not uid 0 (a service's
  `user=`) keeps it across execve too; cleared first, so nothing else is.

capset(2) is called directly, as bubblewrap does: it is one system call
with a two-word structure, and libcap would add a dependency for nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import os
from collections.abc import Iterable

from . import _kernel

__all__ = [
    "ALL_CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "capability_numbers",
    "keep_only",
    "limit_bounding_set",
]

# <linux/capability.h>, in number order.
_NAMES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
_NUMBERS = {name: number for number, name in enumerate(_NAMES)}

ALL_CAPABILITIES: frozenset[str] = frozenset(_NAMES)
"""Every capability name this library knows (Linux 5.9's set, up to CAP_CHECKPOINT_RESTORE)."""

# Podman's default set (containers.conf(5), default_capabilities): what
# root daemons need to start (change owners and ids, bind low ports,
# chroot, signal their own processes), without CAP_SYS_ADMIN, CAP_NET_ADMIN,
# CAP_NET_RAW, CAP_SYS_PTRACE, CAP_MKNOD or CAP_AUDIT_WRITE.
DEFAULT_CAPABILITIES: frozenset[str] = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_CHROOT",
    }
)
"""The capabilities a container's target keeps by default (Podman's default set)."""

# <linux/prctl.h>
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_KEEPCAPS = 8
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
# _LINUX_CAPABILITY_VERSION_3: 64-bit sets, as two 32-bit words.
_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.capget.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data)]
_libc.capset.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data)]


def _normalize(name: str) -> str:
    upper = name.upper()
    return upper if upper.startswith("CAP_") else f"CAP_{upper}"


def capability_numbers(names: Iterable[str]) -> frozenset[int]:
    """Check capability names and return their numbers.

    Names are case-insensitive, with or without the CAP_ prefix.

    Raises:
        TypeError: for a single string or a name that is not a str.
        ValueError: for an unknown name, with the closest known one.
    """
    if isinstance(names, str | bytes):
        raise TypeError(
            f"capabilities is a collection of names, not the string {names!r}; write {{{names!r}}}"
        )
    numbers = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"capabilities holds names like 'CAP_NET_BIND_SERVICE', not {name!r}")
        normalized = _normalize(name)
        if normalized not in _NUMBERS:
            close = difflib.get_close_matches(normalized, _NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (see capabilities(7))"
            raise ValueError(f"unknown capability {name!r}{hint}")
        numbers.add(_NUMBERS[normalized])
    return frozenset(numbers)


def _get() -> tuple[int, int, int]:
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), "capget")

    def word(field: str) -> int:
        return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32

    return word("effective"), word("permitted"), word("inheritable")


def _set(effective: int, permitted: int, inheritable: int) -> None:
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for index in (0, 1):
        shift = 32 * index
        data[index].effective = (effective >> shift) & 0xFFFFFFFF
        data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), "capset")


def _mask(numbers: Iterable[int]) -> int:
    mask = 0
    for number in numbers:
        mask |= 1 << number
    return mask


def _drop_from_bounding_set(kept: int) -> None:
    number = 0
    while True:
        try:
            in_bounding = _kernel.prctl(_PR_CAPBSET_READ, number)
        except OSError:
            return  # EINVAL: past the kernel's last capability
        if in_bounding and not kept >> number & 1:
            _kernel.prctl(_PR_CAPBSET_DROP, number)
        number += 1


def limit_bounding_set(keep: frozenset[int], required: bool, switching_user: bool) -> int:
    """Drop every capability but `keep` from the bounding set; return the mask kept.

    Runs before a service's setuid: with `switching_user`, PR_SET_KEEPCAPS
    keeps the permitted set across it, for `keep_only` to settle after.
    Capabilities in `keep` the process does not hold are an error when
    `required`, and are left out otherwise (the default set, for a caller
    without a user namespace and without root).

    Raises:
        PermissionError: a required capability is not held.
    """
    effective, permitted, _ = _get()
    wanted = _mask(keep)
    missing = wanted & ~permitted
    if missing and required:
        names = sorted(_NAMES[n] for n in range(len(_NAMES)) if missing >> n & 1)
        raise PermissionError(
            1,
            f"the container cannot keep {', '.join(names)}: its process does not hold "
            "them (add 'user' to namespaces, or run as root)",
        )
    kept = wanted & permitted
    # The bounding set cannot shrink without CAP_SETPCAP (capabilities(7)):
    # so it is for a caller without root and without a user namespace, which
    # holds no capability to lose, and no_new_privs keeps a setuid program
    # from granting it any.
    if effective >> _NUMBERS["CAP_SETPCAP"] & 1:
        _drop_from_bounding_set(kept)
    if switching_user:
        _kernel.prctl(_PR_SET_KEEPCAPS, 1)
    return kept


def keep_only(kept: int) -> None:
    """Make the permitted, effective, inheritable and ambient sets exactly `kept`.

    Raises:
        OSError: as capset(2) or prctl(2) fail.
    """
    _set(kept, kept, kept)
    _kernel.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    number = 0
    while kept >> number:
        if kept >> number & 1:
            # Needs the capability in permitted and inheritable (set above).
            _kernel.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, number)
        number += 1
    _kernel.prctl(_PR_SET_KEEPCAPS, 0)
