"""Namespace names, the support predicates, and user-namespace id maps.

This is Guix's `%namespaces`, `user-namespace-supported?` & co. and
`initialize-user-namespace`, with one change: the id maps are not fixed to
"0 UID COUNT" but map `guest_uid`/`guest_gid` to the creator's ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from . import _kernel

__all__ = [
    "NAMESPACES",
    "containers_supported",
    "namespace_clone_flags",
    "normalize_namespaces",
    "setgroups_supported",
    "unprivileged_user_namespace_supported",
    "user_namespace_supported",
    "write_id_maps",
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
    names = frozenset(namespaces)
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


def write_id_maps(
    pid: int,
    *,
    guest_uid: int,
    guest_gid: int,
    host_uid: int,
    host_gid: int,
    count: int,
) -> None:
    """Write /proc/PID/{setgroups,uid_map,gid_map} of a fresh user namespace.

    Maps `count` ids starting at the guest's to the host's (see
    user_namespaces(7)). Unless the writer is root (uid and gid 0), "deny" is
    first written to setgroups: an unprivileged process may only write
    gid_map once setgroups(2) is disabled in the namespace (Linux 3.19,
    CVE-2014-8989), and the file must be written before gid_map.

    Raises:
        OSError: EPERM when the mapping is not allowed (more than one id
            without CAP_SETUID/CAP_SETGID in the parent namespace).
    """
    proc = f"/proc/{pid}"
    if not (host_uid == 0 and host_gid == 0) and setgroups_supported():
        _write_proc_file(f"{proc}/setgroups", "deny")
    _write_proc_file(f"{proc}/uid_map", f"{guest_uid} {host_uid} {count}\n")
    _write_proc_file(f"{proc}/gid_map", f"{guest_gid} {host_gid} {count}\n")


def _write_proc_file(path: str, content: str) -> None:
    # The kernel takes a map in one write(2) call: a buffered writer that
    # splits or repeats writes gets EPERM/EINVAL on the second one.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, content.encode())
    finally:
        os.close(fd)
