"""cgroup limits and accounting for containers: Guix's "Initialize cgroups" TODO.

Each container with `limits=` gets a cgroup of its own in every hierarchy
it needs, below the fork server's own cgroup, in a directory of the
server's (`asynccontainer-PID`): the library only ever creates and removes
cgroups in that sub-tree, and never moves a process it did not clone.

Both cgroup versions are supported, controller by controller, as the
kernel may split them (a "hybrid" host: v1 hierarchies for the
controllers, and a v2 hierarchy without any):

- a controller enabled in the server's v2 cgroup is used there
  (memory.max, pids.max, cpu.max, cpu.weight);
- otherwise its v1 hierarchy (memory.limit_in_bytes, pids.max,
  cpu.cfs_quota_us, cpu.shares);
- the v2 hierarchy, when mounted, always gets a cgroup too: its cpu.stat
  counts CPU time with no controller enabled (cgroups-v2 documentation,
  "Core Interface Files"), and it is the root of the container's cgroup
  namespace there.

The server creates the cgroups and moves the container into them between
clone and its go; the container then unshares its cgroup namespace, which
is rooted where it stands (cgroup_namespaces(7)). When the server reaps
the container it reads the usage, then removes the cgroups: with a pid
namespace (which `limits=` needs) nothing of the container outlives its
first process.

Everything here is synchronous and uses only the standard library: the
fork server imports it.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Mapping

import attrs

__all__ = [
    "CgroupLimits",
    "ContainerCgroup",
    "Hierarchy",
    "ResourceUsage",
    "check_limits",
    "hierarchies",
    "plan_cgroups",
    "remove_server_tree",
    "require_pid_namespace",
    "sweep_stale",
]

# cpu.max's and cpu.cfs_period_us's default period, in microseconds.
_CPU_PERIOD = 100_000
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_KEYS = ("memory", "pids", "cpu", "cpu_weight")
_PREFIX = "asynccontainer-"


@attrs.frozen
class ResourceUsage:
    """What a container used, read from its cgroups when it exited.

    Attributes:
        cpu_time: CPU seconds, user and system, of all its processes.
        memory_peak: the most memory (bytes) charged to it at once, page
            cache included; None if no memory controller is available.
        oom_kills: how many of its processes the kernel's OOM killer killed
            for reaching the memory limit (0 without a memory controller).
    """

    cpu_time: float
    memory_peak: int | None
    oom_kills: int


@attrs.frozen
class CgroupLimits:
    """Checked limits: memory in bytes, a count of tasks, CPUs, and a v2 weight."""

    memory: int | None = None
    pids: int | None = None
    cpu: float | None = None
    cpu_weight: int | None = None

    def controllers(self) -> tuple[str, ...]:
        """Return the controllers these limits need; memory always, for accounting."""
        wanted = ["memory"]
        if self.pids is not None:
            wanted.append("pids")
        if self.cpu is not None or self.cpu_weight is not None:
            wanted.append("cpu")
        return tuple(wanted)


def _parse_size(value: object) -> int:
    wrong_type = TypeError(f"limits['memory'] is bytes or a size like '64M', not {value!r}")
    if isinstance(value, bool):
        raise wrong_type
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        suffix = text[-1:] if text[-1:] in _SIZE_SUFFIXES else ""
        digits = text[: len(text) - len(suffix)]
        if not digits.isdigit():
            raise ValueError(
                f"limits['memory'] {value!r} is not a size: give bytes, or a number "
                "with K, M, G or T (powers of 1024), like '64M'"
            )
        number = int(digits) * _SIZE_SUFFIXES[suffix]
    else:
        raise wrong_type
    # Below a megabyte the container cannot even start its first process.
    if number < 1 << 20:
        raise ValueError(f"limits['memory'] {value!r} is under 1M; a container needs more")
    return number


def _positive_int(name: str, value: object, largest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"limits[{name!r}] is an int, not {value!r}")
    if not 1 <= value <= largest:
        raise ValueError(f"limits[{name!r}] must be from 1 to {largest}, not {value}")
    return value


def require_pid_namespace(namespaces: frozenset[str]) -> None:
    """Check that a container with `limits=` has a pid namespace.

    Raises:
        ValueError: without "pid": processes could outlive the container
            and keep its cgroups from being removed.
    """
    if "pid" not in namespaces:
        raise ValueError(
            "limits= needs the 'pid' namespace, so that every process of the container "
            "ends with it and its cgroups can be removed; add 'pid' to namespaces"
        )


def check_limits(limits: Mapping[str, object]) -> CgroupLimits:
    """Check a `limits=` mapping and return it as CgroupLimits.

    Keys: "memory" (bytes, or "64M"), "pids" (tasks), "cpu" (CPUs, such as
    0.5 for half of one: a quota per period), "cpu_weight" (1 to 10000,
    100 being the default share).

    Raises:
        TypeError, ValueError: naming the key and what to give instead.
    """
    if not isinstance(limits, Mapping):
        raise TypeError(f"limits is a mapping like {{'memory': '64M', 'pids': 64}}, not {limits!r}")
    unknown = sorted(set(limits) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown limits {unknown}; the keys are {', '.join(_KEYS)}")
    memory = pids = cpu_weight = None
    cpu = None
    if "memory" in limits:
        memory = _parse_size(limits["memory"])
    if "pids" in limits:
        pids = _positive_int("pids", limits["pids"], 2**31 - 1)
    if "cpu" in limits:
        value = limits["cpu"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"limits['cpu'] is a number of CPUs like 0.5, not {value!r}")
        # cpu.max: the quota is at least 1 ms per period (cgroups-v2 docs).
        if not 0.01 <= value <= 1_000_000:
            raise ValueError(f"limits['cpu'] must be from 0.01 CPUs up, not {value!r}")
        cpu = float(value)
    if "cpu_weight" in limits:
        cpu_weight = _positive_int("cpu_weight", limits["cpu_weight"], 10_000)
    return CgroupLimits(memory, pids, cpu, cpu_weight)


@attrs.frozen
class Hierarchy:
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
                controllers = frozenset((_read(own, "cgroup.controllers") or "").split())
            else:
                controllers = frozenset(name for name in key if "=" not in name)
            version = 2 if fstype == "cgroup2" else 1
            result.append(Hierarchy(mount_point, version, controllers, own))
    return result


def plan_cgroups(limits: CgroupLimits, mounted: list[Hierarchy] | None = None) -> list[Hierarchy]:
    """Choose the hierarchies a container with `limits` needs (v2 first, then v1).

    `mounted` is what `hierarchies()` returns, read here when None.

    Raises:
        OSError: a controller that no hierarchy offers (ENOTSUP), or a
            cgroup this process may not write to (EACCES).
    """
    if mounted is None:
        mounted = hierarchies()
    v2 = next((h for h in mounted if h.version == 2), None)
    chosen: list[Hierarchy] = [v2] if v2 is not None else []
    for controller in limits.controllers():
        if v2 is not None and controller in v2.controllers:
            continue
        v1 = next((h for h in mounted if h.version == 1 and controller in h.controllers), None)
        if v1 is None:
            if controller == "memory" and limits.memory is None:
                continue  # only wanted for accounting
            raise OSError(
                errno.ENOTSUP,
                f"limits= needs the {controller} cgroup controller, which neither cgroup v2 "
                "nor a v1 hierarchy offers here (see /proc/cgroups)",
            )
        if v1 not in chosen:
            chosen.append(v1)
    if v2 is None:
        # CPU time from v1's cpuacct, when there is no v2 cpu.stat.
        cpuacct = next((h for h in mounted if "cpuacct" in h.controllers), None)
        if cpuacct is not None and cpuacct not in chosen:
            chosen.append(cpuacct)
    for hierarchy in chosen:
        if not os.access(hierarchy.own, os.W_OK):
            raise PermissionError(
                errno.EACCES,
                "limits= needs to create cgroups below this process's cgroup, which it may "
                "not write to: run as root, or in a delegated cgroup (systemd-run --user "
                "--scope -p Delegate=yes)",
                hierarchy.own,
            )
    return chosen


def _write(directory: str, name: str, value: str) -> None:
    with open(os.path.join(directory, name), "w") as file:
        file.write(value)


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name)) as file:
            return file.read()
    except FileNotFoundError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


class ContainerCgroup:
    """The cgroups of one container, in the server: created, filled, read, removed."""

    def __init__(
        self, limits: CgroupLimits, server_pid: int, name: str, mounted: list[Hierarchy]
    ) -> None:
        self.limits = limits
        self.directories: list[tuple[Hierarchy, str]] = []
        try:
            for hierarchy in plan_cgroups(limits, mounted):
                base = os.path.join(hierarchy.own, f"{_PREFIX}{server_pid}")
                os.makedirs(base, exist_ok=True)
                directory = os.path.join(base, name)
                if hierarchy.version == 2:
                    _enable_v2_controllers(hierarchy, base, limits)
                os.mkdir(directory)
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
                if _read(directory, "memory.swap.max") is not None:
                    _write(directory, "memory.swap.max", "0")
            else:
                _write(directory, "memory.limit_in_bytes", str(limits.memory))
                if _read(directory, "memory.memsw.limit_in_bytes") is not None:
                    _write(directory, "memory.memsw.limit_in_bytes", str(limits.memory))
        if limits.pids is not None and "pids" in controllers:
            _write(directory, "pids.max", str(limits.pids))
        if "cpu" in controllers:
            quota = None if limits.cpu is None else round(limits.cpu * _CPU_PERIOD)
            if v2:
                if quota is not None:
                    _write(directory, "cpu.max", f"{quota} {_CPU_PERIOD}")
                if limits.cpu_weight is not None:
                    _write(directory, "cpu.weight", str(limits.cpu_weight))
            else:
                if quota is not None:
                    _write(directory, "cpu.cfs_period_us", str(_CPU_PERIOD))
                    _write(directory, "cpu.cfs_quota_us", str(quota))
                if limits.cpu_weight is not None:
                    # v1 shares are 1024 for the default weight of 100.
                    shares = max(2, limits.cpu_weight * 1024 // 100)
                    _write(directory, "cpu.shares", str(shares))

    def add(self, pid: int) -> None:
        """Move the process `pid` (a container not yet running) into every cgroup."""
        for _, directory in self.directories:
            _write(directory, "cgroup.procs", str(pid))

    def usage(self) -> ResourceUsage:
        """Read what the container used: CPU time, memory peak, OOM kills."""
        cpu_time = 0.0
        memory_peak = None
        oom_kills = 0
        for hierarchy, directory in self.directories:
            controllers = hierarchy.controllers
            if hierarchy.version == 2:
                usec = _keyed(_read(directory, "cpu.stat"), "usage_usec")
                cpu_time = (usec or 0) / 1e6
                if "memory" in controllers:
                    peak = _read(directory, "memory.peak")
                    memory_peak = None if peak is None else int(peak)
                    oom_kills = _keyed(_read(directory, "memory.events"), "oom_kill") or 0
            else:
                if "memory" in controllers:
                    peak = _read(directory, "memory.max_usage_in_bytes")
                    memory_peak = None if peak is None else int(peak)
                    control = _read(directory, "memory.oom_control")
                    oom_kills = _keyed(control, "oom_kill") or 0
                if "cpuacct" in controllers and not any(
                    h.version == 2 for h, _ in self.directories
                ):
                    nanoseconds = _read(directory, "cpuacct.usage")
                    cpu_time = int(nanoseconds or 0) / 1e9
        return ResourceUsage(cpu_time=cpu_time, memory_peak=memory_peak, oom_kills=oom_kills)

    def remove(self) -> None:
        """Remove the cgroups, killing any process still in them first.

        With a pid namespace they are empty once the container is reaped;
        a process can only be left by a failed start.
        """
        for _, directory in reversed(self.directories):
            _remove(directory)
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
    enabled = set((_read(hierarchy.own, "cgroup.subtree_control") or "").split())
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
        for line in (_read(directory, "cgroup.procs") or "").split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Exiting tasks leave their cgroup a moment after the signal.
        time.sleep(0.001)


def remove_server_tree(server_pid: int) -> None:
    """Remove the server's own directories (at its shutdown), where they are empty."""
    for hierarchy in _safe_hierarchies():
        base = os.path.join(hierarchy.own, f"{_PREFIX}{server_pid}")
        try:
            os.rmdir(base)
        except OSError:
            pass


def _safe_hierarchies() -> list[Hierarchy]:
    try:
        return hierarchies()
    except OSError:
        return []


def sweep_stale() -> None:
    """Remove what servers that died (SIGKILL) left: empty cgroups of dead servers."""
    for hierarchy in _safe_hierarchies():
        try:
            names = os.listdir(hierarchy.own)
        except OSError:
            continue
        for name in names:
            if not name.startswith(_PREFIX) or not name[len(_PREFIX) :].isdigit():
                continue
            if os.path.exists(f"/proc/{name[len(_PREFIX) :]}"):
                continue
            base = os.path.join(hierarchy.own, name)
            try:
                for child in os.listdir(base):
                    if os.path.isdir(os.path.join(base, child)):
                        _remove(os.path.join(base, child))
                os.rmdir(base)
            except OSError:
                pass
