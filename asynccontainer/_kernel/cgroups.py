"""cgroupfs, as the library uses it: a cgroup's members, killed, frozen, removed.

Used by the fork server for the cgroup it makes for every container
(`_forkserver.lifetime`), and by the caller to end what a fork server that
was killed left running. See cgroups(7) and the kernel's cgroup-v2 and
cgroup-v1 freezer documentation.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import NamedTuple

__all__ = [
    "CPU_PERIOD",
    "PREFIX",
    "Hierarchy",
    "TrackedCgroup",
    "hierarchies",
    "read_cgroup_file",
    "remove_tree",
]

# The name of every cgroup the library makes starts with it (and the fork server's PID).
PREFIX = "asynccontainer-"
# cpu.max's and cpu.cfs_period_us's default period, in microseconds.
CPU_PERIOD = 100_000

# How long a freeze may take before the members are killed anyway, and how
# long removing an emptied tree waits for its killed tasks to leave.
_FREEZE_TIMEOUT = 1.0
_REMOVE_TIMEOUT = 2.0


def read_cgroup_file(directory: str, name: str) -> str | None:
    """Return the content of a cgroup file, or None if the cgroup has no such file."""
    try:
        with open(os.path.join(directory, name)) as file:
            return file.read()
    except FileNotFoundError:
        return None


def _write(directory: str, name: str, value: str) -> None:
    # Without O_CREAT: open(2) of a missing file in cgroupfs with it fails
    # with EACCES (a kernfs directory takes no new file), not ENOENT.
    fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _keyed(directory: str, name: str, key: str) -> str | None:
    for line in (read_cgroup_file(directory, name) or "").splitlines():
        field, _, value = line.partition(" ")
        if field == key:
            return value
    return None


def _members(directory: str) -> list[int]:
    """Return the PIDs in `directory` and every cgroup below it."""
    pids: list[int] = []
    for path, _, _ in os.walk(directory):
        try:
            pids.extend(int(pid) for pid in (read_cgroup_file(path, "cgroup.procs") or "").split())
        except OSError:
            continue  # removed meanwhile
    return pids


def remove_tree(directory: str) -> bool:
    """Remove `directory` and the cgroups below it, deepest first; True once all are gone.

    A container whose processes may write its cgroupfs can make cgroups
    below its own; they go too. False while any is populated (EBUSY).
    """
    try:
        os.rmdir(directory)  # the common case, a leaf: no walk (scandir) needed
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise
    for path, _, _ in os.walk(directory, topdown=False):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise
    return True


class TrackedCgroup:
    """One container's (or zygote's) cgroup, made by the server: cloned into, killed, removed."""

    def __init__(self, path: str, version: int) -> None:
        self.path = path
        self.version = version

    def open(self) -> int:
        """Return an fd of the directory, for clone3's CLONE_INTO_CGROUP (the caller closes it)."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def add(self, pid: int) -> None:
        """Move `pid` in (v1: clone3 only clones into a v2 cgroup)."""
        _write(self.path, "cgroup.procs", str(pid))

    def populated(self) -> bool:
        """Return True while a live process is in the cgroup or below it."""
        if self.version == 2:
            value = _keyed(self.path, "cgroup.events", "populated")
            return value is not None and value != "0"
        return bool(_members(self.path))

    def kill(self) -> None:
        """SIGKILL every process in the cgroup and below it, also those forking meanwhile."""
        if self.version == 2:
            # One write, atomic against forks (Linux 5.14); before it, a freeze.
            if self._write("cgroup.kill", "1"):
                return
            self._freeze_and_kill("cgroup.freeze", "1", "0")
        else:
            # Only the freezer hierarchy can freeze: elsewhere (the v1
            # hierarchies of limits=, swept) the members are killed round by
            # round until none is left.
            self._freeze_and_kill("freezer.state", "FROZEN", "THAWED")

    def _write(self, name: str, value: str) -> bool:
        try:
            _write(self.path, name, value)
        except FileNotFoundError:
            return False  # no such file here, or the cgroup is gone
        return True

    def _freeze_and_kill(self, name: str, frozen: str, thawed: str) -> None:
        """Freeze, kill every member, thaw: nothing forks between the listing and the kill.

        A process frozen by the v1 freezer only dies once thawed; v2 lets a
        fatal signal through (cgroup-v2 documentation, "cgroup.freeze").
        """
        freezes = self._write(name, frozen)
        deadline = time.monotonic() + _FREEZE_TIMEOUT
        while freezes and not self._frozen() and time.monotonic() < deadline:
            time.sleep(0.001)
        while True:
            members = _members(self.path)
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if freezes or not members or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        if freezes:
            self._write(name, thawed)

    def _frozen(self) -> bool:
        if self.version == 2:
            return _keyed(self.path, "cgroup.events", "frozen") == "1"
        state = read_cgroup_file(self.path, "freezer.state")
        return state is None or state.strip() == "FROZEN"

    def remove(self, wait: float = _REMOVE_TIMEOUT) -> bool:
        """Remove the cgroup (and any below it) if nothing lives in it; True once it is gone.

        A task that has just exited leaves its cgroup a moment later (rmdir
        fails with EBUSY until then): that is waited for, `wait` seconds at
        most, rather than for another wakeup.
        """
        if self.populated():
            return False
        deadline = time.monotonic() + wait
        while not remove_tree(self.path):
            if time.monotonic() > deadline or self.populated():
                return False
            time.sleep(0.0005)
        return True

    def end(self) -> None:
        """Kill what is in the cgroup and remove it, waiting (boundedly) for the killed to leave."""
        self.kill()
        deadline = time.monotonic() + _REMOVE_TIMEOUT
        while not self.remove() and time.monotonic() < deadline:
            time.sleep(0.001)


class Hierarchy(NamedTuple):
    """A mounted cgroup hierarchy: v2, or v1 with its controllers."""

    mount_point: str
    version: int
    controllers: frozenset[str]
    # The calling process's cgroup in it, as a directory.
    own: str


def _controller_names() -> frozenset[str]:
    # /proc/cgroups lists every controller the kernel has, first column.
    with open("/proc/cgroups") as file:
        return frozenset(
            line.split()[0] for line in file if line.strip() and not line.startswith("#")
        )


def hierarchies() -> list[Hierarchy]:
    """Return every cgroup hierarchy mounted here, with this process's cgroup in each."""
    known = _controller_names()
    paths: dict[frozenset[str], str] = {}
    with open("/proc/self/cgroup") as file:
        for line in file:
            _, names, path = line.rstrip("\n").split(":", 2)
            paths[frozenset(names.split(",")) if names else frozenset()] = path
    result = []
    with open("/proc/self/mountinfo") as file:
        for line in file:
            fields = line.split()
            separator = fields.index("-")
            fstype, options = fields[separator + 1], fields[separator + 3]
            root, mount_point = fields[3], fields[4]
            if fstype == "cgroup2":
                key: frozenset[str] = frozenset()
            elif fstype == "cgroup":
                # Super options: "rw,cpu,cpuacct", "rw,xattr,name=systemd" ...
                key = frozenset(
                    o for o in options.split(",") if o in known or o.startswith("name=")
                )
            else:
                continue
            cgroup = paths.get(key)
            if cgroup is None:
                continue
            # A mount of a sub-tree (root not "/") shows paths below its root.
            if root != "/" and (cgroup + "/").startswith(root + "/"):
                cgroup = cgroup[len(root) :]
            own = os.path.normpath(os.path.join(mount_point, cgroup.lstrip("/")))
            if not os.path.isdir(own):
                continue
            if fstype == "cgroup2":
                controllers = frozenset((read_cgroup_file(own, "cgroup.controllers") or "").split())
            else:
                controllers = frozenset(name for name in key if "=" not in name)
            version = 2 if fstype == "cgroup2" else 1
            result.append(Hierarchy(mount_point, version, controllers, own))
    return result
