"""Capabilities the target keeps: their names, and the check of a `capabilities=` value.

A process that is root in its own user namespace holds every capability
there (user_namespaces(7)). Most targets need few of them, and each one
kept is kernel surface a hostile target can reach: CAP_SYS_ADMIN alone
lets it mount, make namespaces and use many ioctls. The drop itself is
done in the container (`_forkserver.capabilities`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ALL_CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "capability_name",
    "capability_numbers",
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
"""The capabilities a container's target keeps by default (Podman's default set).

For a root caller the default is this set without CAP_SETFCAP and
CAP_FSETID (see `ContainerSpec`).
"""


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


def missing_capabilities(mask: int) -> str:
    """Say that the capabilities of `mask` cannot be kept (the text of a PermissionError)."""
    names = sorted(capability_name(n) for n in range(64) if mask >> n & 1)
    return (
        f"the container cannot keep {', '.join(names)}: its process does not hold "
        "them (add 'user' to namespaces, or run as root)"
    )


def capability_name(number: int) -> str:
    """Return the name of capability `number` ("CAP_SYS_ADMIN"); "CAP_<number>" past the last."""
    return _NAMES[number] if 0 <= number < len(_NAMES) else f"CAP_{number}"
