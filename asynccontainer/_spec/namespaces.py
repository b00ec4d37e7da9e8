"""Namespace names and the support predicates (Guix's `%namespaces`, `user-namespace-supported?`).

The id maps of a new user namespace are written by the fork server
(`_forkserver.idmaps`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .. import _kernel

__all__ = [
    "NAMESPACES",
    "containers_supported",
    "namespace_clone_flags",
    "normalize_namespaces",
    "setgroups_supported",
    "unprivileged_user_namespace_supported",
    "user_namespace_supported",
]

NAMESPACES: tuple[str, ...] = ("cgroup", "mnt", "pid", "ipc", "uts", "user", "net")
"""Every namespace name, in Guix's order. Any `namespaces=` argument takes these."""

_CLONE_FLAGS = {
    "cgroup": _kernel.CLONE_NEWCGROUP,
    "mnt": _kernel.CLONE_NEWNS,
    "pid": _kernel.CLONE_NEWPID,
    "ipc": _kernel.CLONE_NEWIPC,
    "uts": _kernel.CLONE_NEWUTS,
    "user": _kernel.CLONE_NEWUSER,
    "net": _kernel.CLONE_NEWNET,
}


def normalize_namespaces(namespaces: Iterable[str]) -> frozenset[str]:
    """Return `namespaces` as a frozenset after checking every name.

    Raises:
        TypeError: when `namespaces` is a string (a common slip for a tuple
            of one) or holds something other than strings.
        ValueError: naming each unknown namespace and listing the known ones.
    """
    if isinstance(namespaces, str | bytes):
        raise TypeError(
            f"namespaces must be an iterable of names, not the string {namespaces!r}; "
            f"write ({namespaces!r},) for a single namespace"
        )
    try:
        names = frozenset(namespaces)
    except TypeError:
        raise TypeError(
            f"namespaces must be an iterable of names such as ('mnt', 'pid'), not {namespaces!r}"
        ) from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"namespace names are strings, not {name!r}")
    unknown = sorted(names - set(NAMESPACES))
    if unknown:
        raise ValueError(
            f"unknown namespace name(s) {', '.join(map(repr, unknown))}; "
            f"choose among {', '.join(NAMESPACES)}"
        )
    return names


def namespace_clone_flags(namespaces: Iterable[str]) -> int:
    """Return the CLONE_NEW* flags for the (already checked) namespace names."""
    flags = 0
    for name in namespaces:
        flags |= _CLONE_FLAGS[name]
    return flags


def user_namespace_supported() -> bool:
    """Return True if this kernel has user namespaces (/proc/self/ns/user exists)."""
    return os.path.exists("/proc/self/ns/user")


def unprivileged_user_namespace_supported() -> bool:
    """Return True if users other than root may create user namespaces.

    As Guix does, this reads Debian's /proc/sys/kernel/unprivileged_userns_clone
    when it exists (it must start with "1"), and otherwise falls back to
    `user_namespace_supported`.
    """
    knob = "/proc/sys/kernel/unprivileged_userns_clone"
    if os.path.exists(knob):
        with open(knob) as file:
            return file.read(1) == "1"
    return user_namespace_supported()


def setgroups_supported() -> bool:
    """Return True if /proc/PID/setgroups exists (Linux 3.19 and later)."""
    return os.path.exists("/proc/self/setgroups")


def containers_supported() -> bool:
    """Return True if all three predicates above hold."""
    return (
        user_namespace_supported()
        and unprivileged_user_namespace_supported()
        and setgroups_supported()
    )
