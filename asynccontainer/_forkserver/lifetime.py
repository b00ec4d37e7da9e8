"""A cgroup of its own for every container, in the fork server: so that nothing outlives it.

Without a pid namespace, what a container's processes fork (a daemon that
called setsid, a background job) does not end with its first process, and
no process group or session holds it. A cgroup does: every process forked
inside stays in it (cgroups(7)), so the server clones each container, and
each zygote ahead of need, into a fresh cgroup of its own sub-tree
(`asynccontainer-PID`, below the server's cgroup, beside the cgroups of
`limits=`), and kills by cgroup:

- cgroup v2: with one write to cgroup.kill (Linux 5.14), which also kills
  what forks while it runs; on older kernels, freeze (cgroup.freeze), kill
  every member, thaw;
- only cgroup v1 mounted: in the freezer hierarchy, freeze (freezer.state),
  kill every member, thaw.

Where the server may create no cgroup (an unprivileged caller outside a
delegated cgroup), nothing is tracked: what a container without a pid
namespace leaves is adopted by the server (a subreaper) and killed when it
shuts down. docs/security.md says so.
"""

from __future__ import annotations

import os
import signal

from .. import _kernel
from .._kernel.cgroups import PREFIX, Hierarchy, TrackedCgroup

__all__ = ["Tracking", "clone_into", "move_in"]


class Tracking:
    """The server's sub-tree of tracking cgroups, in one hierarchy: v2, or v1's freezer."""

    def __init__(self, hierarchy: Hierarchy, server_pid: int) -> None:
        self.version = hierarchy.version
        self.base = os.path.join(hierarchy.own, f"{PREFIX}{server_pid}")
        self._count = 0

    @classmethod
    def choose(cls, mounted: list[Hierarchy], server_pid: int) -> Tracking | None:
        """Return the tracking for the first usable hierarchy (v2, else v1 freezer), or None."""
        usable = [h for h in mounted if h.version == 2]
        usable += [h for h in mounted if h.version == 1 and "freezer" in h.controllers]
        for hierarchy in usable:
            tracking = cls(hierarchy, server_pid)
            try:
                os.makedirs(tracking.base, exist_ok=True)
            except OSError:
                continue  # not ours to write (an unprivileged caller): the next, or none
            return tracking
        return None

    def create(self) -> TrackedCgroup:
        """Make a new, empty cgroup; names are never reused by this server.

        Raises:
            OSError: as mkdir(2) in cgroupfs sets it (ENOSPC past
                cgroup.max.descendants, EACCES).
        """
        self._count += 1
        cgroup = TrackedCgroup(os.path.join(self.base, str(self._count)), self.version)
        os.mkdir(cgroup.path)
        return cgroup


def move_in(cgroup: TrackedCgroup, pid: int) -> None:
    """Move a child that waits for its go into a v1 `cgroup`; on failure, end it.

    Before its go the child runs nothing of its own: moved now, it has never
    been outside. One that cannot be moved is killed and reaped here, so
    that its cgroup can be removed (and a C child's mapping freed) at once.

    Raises:
        OSError: as the write to cgroup.procs fails.
    """
    try:
        cgroup.add(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise


def clone_into(flags: int, cgroup: TrackedCgroup) -> int:
    """Clone (see `_kernel.clone`) with the child in `cgroup`, from its first instruction on v2."""
    if cgroup.version == 1:
        pid = _kernel.clone(flags)
        if pid:
            move_in(cgroup, pid)
        return pid
    fd = cgroup.open()
    try:
        return _kernel.clone(flags, fd)
    finally:
        # In the child too: nothing of the server's may stay open there.
        os.close(fd)
