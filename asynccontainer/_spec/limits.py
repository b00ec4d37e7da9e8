"""cgroup limits and accounting: the checked `limits=` value, and the choice of hierarchies.

Guix's "Initialize cgroups" TODO. Both cgroup versions are supported,
controller by controller, as the kernel may split them (a "hybrid" host: v1
hierarchies for the controllers, and a v2 hierarchy without any):

- a controller enabled in the server's v2 cgroup is used there
  (memory.max, pids.max, cpu.max, cpu.weight);
- otherwise its v1 hierarchy (memory.limit_in_bytes, pids.max,
  cpu.cfs_quota_us, cpu.shares);
- the v2 hierarchy, when mounted, always gets a cgroup too: its cpu.stat
  counts CPU time with no controller enabled (cgroups-v2 documentation,
  "Core Interface Files"), and it is the root of the container's cgroup
  namespace there.

The caller checks the limits and the hierarchies before anything is
spawned; the fork server creates the cgroups (`_forkserver.cgroupfs`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping

import attrs

from .._kernel.cgroups import CPU_PERIOD, PREFIX, Hierarchy, hierarchies, read_cgroup_file

__all__ = [
    "CPU_PERIOD",
    "PREFIX",
    "CgroupLimits",
    "Hierarchy",
    "ResourceUsage",
    "check_limits",
    "hierarchies",
    "plan_cgroups",
    "read_cgroup_file",
    "require_pid_namespace",
]

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_KEYS = ("memory", "pids", "cpu", "cpu_weight")
# 8 EiB less a page: the largest limit memory.max and memory.limit_in_bytes keep.
_MAX_MEMORY = 2**63 - 4096


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
    # The cgroup files take a signed 64-bit byte count (and round it to pages).
    if number > _MAX_MEMORY:
        raise ValueError(
            f"limits['memory'] {value!r} is more than any machine has; "
            "leave 'memory' out for no limit"
        )
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


def _v1_hierarchy(mounted: list[Hierarchy], controller: str) -> Hierarchy | None:
    return next((h for h in mounted if h.version == 1 and controller in h.controllers), None)


def _check_writable(chosen: list[Hierarchy]) -> None:
    for hierarchy in chosen:
        if not os.access(hierarchy.own, os.W_OK):
            raise PermissionError(
                errno.EACCES,
                "limits= needs to create cgroups below this process's cgroup, which it may "
                "not write to: run as root, or in a delegated cgroup (systemd-run --user "
                "--scope -p Delegate=yes)",
                hierarchy.own,
            )


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
        v1 = _v1_hierarchy(mounted, controller)
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
        cpuacct = _v1_hierarchy(mounted, "cpuacct")
        if cpuacct is not None and cpuacct not in chosen:
            chosen.append(cpuacct)
    _check_writable(chosen)
    return chosen
