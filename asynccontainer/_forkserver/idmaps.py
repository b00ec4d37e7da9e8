"""Id maps of a new user namespace, written by the fork server: Guix's initialize-user-namespace.

One change from Guix: the maps are not fixed to "0 UID COUNT" but map
`guest_uid`/`guest_gid` to the creator's ids.
"""

from __future__ import annotations

import os

from .._spec.namespaces import setgroups_supported

__all__ = ["write_id_maps"]


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
