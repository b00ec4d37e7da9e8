"""A container's cgroups, in the fork server: created, filled, read and removed.

Each container with `limits=` gets a cgroup of its own in every hierarchy
it needs (chosen by `_spec.limits.plan_cgroups`), below the fork server's
own cgroup, in a directory of the server's (`asynccontainer-PID`): the
library only ever creates and removes cgroups in that sub-tree, and never
moves a process it did not clone.

The server creates the cgroups and moves the container into them between
clone and its go; the container then unshares its cgroup namespace, which
is rooted where it stands (cgroup_namespaces(7)). When the server reaps
the container it reads the usage, then removes the cgroups: with a pid
namespace (which `limits=` needs) nothing of the container outlives its
first process.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import TYPE_CHECKING

from .._kernel.cgroups import (
    CPU_PERIOD,
    PREFIX,
    Hierarchy,
    TrackedCgroup,
    hierarchies,
    read_cgroup_file,
)

if TYPE_CHECKING:
    from .._spec.limits import CgroupLimits, ResourceUsage

__all__ = ["ContainerCgroup", "remove_server_tree", "sweep_stale"]


def _write(directory: str, name: str, value: str) -> None:
    with open(os.path.join(directory, name), "w") as file:
        file.write(value)


def _keyed(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


class ContainerCgroup:
    """The cgroups of one container, in the server: created, filled, read, removed."""

    def __init__(
        self,
        limits: CgroupLimits,
        server_pid: int,
        name: str,
        mounted: list[Hierarchy],
        v2_directory: str | None,
    ) -> None:
        """Make the cgroups; in v2, `v2_directory` is the container's tracking cgroup, used as is.

        Raises:
            OSError: a cgroup that cannot be made or written (the caller
                checked the hierarchies, so something changed since).
        """
        # _spec.limits (and attrs) only for a container with limits=: the
        # fork server's start imports neither (issue 13).
        from .._spec.limits import plan_cgroups

        self.limits = limits
        self.directories: list[tuple[Hierarchy, str]] = []
        # Made here, removed here: not the tracking cgroup, which outlives this.
        self.made: list[str] = []
        try:
            for hierarchy in plan_cgroups(limits, mounted):
                base = os.path.join(hierarchy.own, f"{PREFIX}{server_pid}")
                os.makedirs(base, exist_ok=True)
                if hierarchy.version == 2:
                    _enable_v2_controllers(hierarchy, base, limits)
                if hierarchy.version == 2 and v2_directory is not None:
                    directory = v2_directory
                else:
                    directory = os.path.join(base, name)
                    os.mkdir(directory)
                    self.made.append(directory)
                self.directories.append((hierarchy, directory))
                self._apply(hierarchy, directory)
        except BaseException:
            self.remove()
            raise

    def _apply(self, hierarchy: Hierarchy, directory: str) -> None:
        limits = self.limits
        controllers = hierarchy.controllers
        v2 = hierarchy.version == 2
        if limits.memory is not None and "memory" in controllers:
            if v2:
                _write(directory, "memory.max", str(limits.memory))
                # A limit is a limit: no swapping instead of the OOM kill.
                if read_cgroup_file(directory, "memory.swap.max") is not None:
                    _write(directory, "memory.swap.max", "0")
            else:
                _write(directory, "memory.limit_in_bytes", str(limits.memory))
                if read_cgroup_file(directory, "memory.memsw.limit_in_bytes") is not None:
                    _write(directory, "memory.memsw.limit_in_bytes", str(limits.memory))
        if limits.pids is not None and "pids" in controllers:
            _write(directory, "pids.max", str(limits.pids))
        if "cpu" in controllers:
            quota = None if limits.cpu is None else round(limits.cpu * CPU_PERIOD)
            if v2:
                if quota is not None:
                    _write(directory, "cpu.max", f"{quota} {CPU_PERIOD}")
                if limits.cpu_weight is not None:
                    _write(directory, "cpu.weight", str(limits.cpu_weight))
            else:
                if quota is not None:
                    _write(directory, "cpu.cfs_period_us", str(CPU_PERIOD))
                    _write(directory, "cpu.cfs_quota_us", str(quota))
                if limits.cpu_weight is not None:
                    # v1 shares are 1024 for the default weight of 100.
                    shares = max(2, limits.cpu_weight * 1024 // 100)
                    _write(directory, "cpu.shares", str(shares))

    def add(self, pid: int) -> None:
        """Move the process `pid` (a container not yet running) into the cgroups made here.

        It was cloned into its tracking cgroup, the v2 one, already.
        """
        for directory in self.made:
            _write(directory, "cgroup.procs", str(pid))

    def usage(self) -> ResourceUsage:
        """Read what the container used: CPU time, memory peak, OOM kills."""
        cpu_time = 0.0
        memory_peak = None
        oom_kills = 0
        for hierarchy, directory in self.directories:
            controllers = hierarchy.controllers
            if hierarchy.version == 2:
                usec = _keyed(read_cgroup_file(directory, "cpu.stat"), "usage_usec")
                cpu_time = (usec or 0) / 1e6
                if "memory" in controllers:
                    peak = read_cgroup_file(directory, "memory.peak")
                    memory_peak = None if peak is None else int(peak)
                    oom_kills = (
                        _keyed(read_cgroup_file(directory, "memory.events"), "oom_kill") or 0
                    )
            else:
                if "memory" in controllers:
                    peak = read_cgroup_file(directory, "memory.max_usage_in_bytes")
                    memory_peak = None if peak is None else int(peak)
                    control = read_cgroup_file(directory, "memory.oom_control")
                    oom_kills = _keyed(control, "oom_kill") or 0
                if "cpuacct" in controllers and not any(
                    h.version == 2 for h, _ in self.directories
                ):
                    nanoseconds = read_cgroup_file(directory, "cpuacct.usage")
                    cpu_time = int(nanoseconds or 0) / 1e9
        from .._spec.limits import ResourceUsage

        return ResourceUsage(cpu_time=cpu_time, memory_peak=memory_peak, oom_kills=oom_kills)

    def remove(self) -> None:
        """Remove the cgroups, killing any process still in them first.

        With a pid namespace they are empty once the container is reaped;
        a process can only be left by a failed start.
        """
        for directory in reversed(self.made):
            _remove(directory)
        self.made.clear()
        self.directories.clear()


def _enable_v2_controllers(hierarchy: Hierarchy, base: str, limits: CgroupLimits) -> None:
    """Enable the v2 controllers the limits need in the server's sub-tree.

    A controller is usable in a cgroup only if its parent enables it in
    cgroup.subtree_control, which the kernel refuses (EBUSY) in a cgroup
    with processes of its own ("no internal processes", cgroups-v2
    documentation): the server's own cgroup must already enable them.
    """
    wanted = [c for c in limits.controllers() if c in hierarchy.controllers]
    if not wanted:
        return
    enabled = set((read_cgroup_file(hierarchy.own, "cgroup.subtree_control") or "").split())
    missing = [c for c in wanted if c not in enabled]
    if missing:
        try:
            _write(hierarchy.own, "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"limits= needs the {', '.join(missing)} controller(s) enabled below the "
                "fork server's cgroup, which the kernel refused (a cgroup with processes "
                "cannot enable them for its children); run the program in a delegated "
                "cgroup of its own, such as systemd-run --scope -p Delegate=yes",
                hierarchy.own,
            ) from None
    _write(base, "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))


def _remove(directory: str) -> None:
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return  # left for sweep_stale, at the next server's start
        for line in (read_cgroup_file(directory, "cgroup.procs") or "").split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Exiting tasks leave their cgroup a moment after the signal.
        time.sleep(0.001)


def remove_server_tree(server_pid: int) -> None:
    """Remove the server's own directories (at its shutdown), where they are empty."""
    for hierarchy in _safe_hierarchies():
        base = os.path.join(hierarchy.own, f"{PREFIX}{server_pid}")
        try:
            os.rmdir(base)
        except OSError:
            pass


def _safe_hierarchies() -> list[Hierarchy]:
    try:
        return hierarchies()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Tell whether `pid` runs: a zombie (a killed server not yet reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def sweep_stale() -> None:
    """End what servers that died (SIGKILL) left: their cgroups, and what still runs in them.

    A server killed from outside cannot end the daemons of its containers
    without a pid namespace: they are still in its tracking cgroups, and
    are killed here, by the next server of the same cgroup.
    """
    for hierarchy in _safe_hierarchies():
        try:
            names = os.listdir(hierarchy.own)
        except OSError:
            continue
        for name in names:
            if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
                continue
            if _alive(int(name[len(PREFIX) :])):
                continue
            try:
                TrackedCgroup(os.path.join(hierarchy.own, name), hierarchy.version).end()
            except OSError:
                pass  # left for the next server
