"""cgroup limits: what a container may use of the host, and what it used.

Guards against resource exhaustion of the host by a container, the class of
CVE-2019-14891 (cri-o: a container could fill the host's memory) and of
fork bombs (CWE-400): without limits one container takes the machine down
for every other process. On this machine the controllers are cgroup v1
hierarchies and v2 has none: the tests go through the v1 fallback, and the
v2 hierarchy for CPU time and the cgroup namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import anyio
import pytest
from capture import sh

import asynccontainer as ac
from asynccontainer._core import client as _client
from asynccontainer._spec import limits as _cgroups

SYSTEM = ac.HOST_SYSTEM_MAPPINGS
# Doubles a string until the memory limit stops it.
HOG = "x = b'x' * (1 << 20)\nwhile True: x = x + x"


def cgroup_dir(pid: int, controller: str) -> str:
    """Return the host directory of process `pid`'s cgroup for `controller`."""
    hierarchy = next(h for h in _cgroups.hierarchies() if controller in h.controllers)
    with open(f"/proc/{pid}/cgroup") as file:
        for line in file:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(","):
                return os.path.join(hierarchy.mount_point, path.lstrip("/"))
    raise AssertionError(f"{pid} has no {controller} cgroup")


def read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as file:
        return file.read().strip()


async def test_memory_hog_is_oom_killed_and_reported() -> None:
    """The hog dies of SIGKILL at 32 MiB; usage says the OOM killer did it."""
    async with await ac.run_container(
        ["python3", "-c", HOG], mounts=SYSTEM, limits={"memory": "32M"}, stderr=subprocess.DEVNULL
    ) as container:
        assert container.usage is None
        assert await container.wait() == -9
    usage = container.usage
    assert usage is not None
    assert usage.oom_kills >= 1
    assert usage.memory_peak is not None and usage.memory_peak <= 32 << 20


async def test_control_the_same_memory_fits_without_a_limit() -> None:
    """Accounting only (limits={}): 64 MiB are allocated, and the peak shows it."""
    grow = "x = b'x' * (64 << 20); print(len(x) >> 20)"
    container = await ac.run_container(["python3", "-c", grow], mounts=SYSTEM, limits={})
    async with container:
        assert await container.wait() == 0
    usage = container.usage
    assert usage is not None
    assert usage.oom_kills == 0
    assert usage.memory_peak is not None and usage.memory_peak >= 64 << 20
    assert usage.cpu_time > 0


async def test_fork_bomb_is_contained_and_the_host_stays_responsive() -> None:
    """Under pids=64 the bomb hits the limit, never passes it, and the host still forks."""
    # The sleep first, and PID 1 waiting: a `sleep` forked after the bomb
    # could find no PID left, and PID 1 would exit (seen once in CI).
    bomb = "sleep 300 & bomb() { bomb | bomb & }; bomb; wait"
    container = await ac.run_container(
        ["sh", "-c", bomb], mounts=SYSTEM, limits={"pids": 64}, stderr=subprocess.DEVNULL
    )
    async with container:
        directory = cgroup_dir(container.pid, "pids")
        assert read(directory, "pids.max") == "64"
        with anyio.fail_after(20):
            while int(read(directory, "pids.events").split()[1]) == 0:
                await anyio.sleep(0.01)
        assert int(read(directory, "pids.current")) <= 64
        # The host still starts processes, and promptly (a generous bound).
        started = time.monotonic()
        done = await anyio.run_process([sys.executable, "-c", "pass"])
        assert done.returncode == 0
        assert time.monotonic() - started < 10
    assert container.returncode == -9


async def test_cpu_quota_and_weight() -> None:
    """The quota and the weight are written; a busy loop gets no more than its share."""
    loop = "timeout 1 sh -c 'while :; do :; done'; echo $?"
    container = await ac.run_container(
        ["sh", "-c", f"sleep 0.2; {loop}"],
        mounts=SYSTEM,
        limits={"cpu": 0.1, "cpu_weight": 50},
        stdout=subprocess.DEVNULL,
    )
    async with container:
        directory = cgroup_dir(container.pid, "cpu")
        assert read(directory, "cpu.cfs_quota_us") == "10000"
        assert read(directory, "cpu.cfs_period_us") == "100000"
        assert read(directory, "cpu.shares") == "512"
        assert await container.wait() == 0
    usage = container.usage
    assert usage is not None
    # 0.1 CPU for about a second; the bound leaves room for the shells.
    assert 0 < usage.cpu_time < 0.4


async def test_cgroup_namespace_shows_only_its_own_tree() -> None:
    """Inside, every hierarchy's cgroup is "/"; without the namespace the path shows."""
    returncode, out = await sh("cat /proc/self/cgroup", limits={})
    assert returncode == 0
    assert out and all(line.endswith(":/") for line in out.splitlines())
    returncode, out = await sh(
        "cat /proc/self/cgroup", limits={}, namespaces=["mnt", "pid", "user"]
    )
    assert returncode == 0
    assert "/asynccontainer-" in out


async def test_no_cgroup_is_left_by_a_failed_start_or_a_cancellation() -> None:
    """The leak check (conftest) fails the test if any container cgroup remains."""
    with pytest.raises(FileNotFoundError):
        await ac.run_container(["no-such-program"], limits={"pids": 8})
    with anyio.move_on_after(0.0005):
        await ac.run_container(["sleep", "60"], mounts=SYSTEM, limits={"pids": 8})
    assert await ac.call_with_container(["true"], mounts=SYSTEM, limits={"memory": "64M"}) == 0


async def test_a_stale_tree_of_a_killed_server_is_swept() -> None:
    """A server killed before its shutdown leaves cgroups; the next server removes them."""
    hierarchy = next(h for h in _cgroups.hierarchies() if "pids" in h.controllers)
    # A PID nobody has: above the kernel's pid_max.
    with open("/proc/sys/kernel/pid_max") as file:
        stale_pid = int(file.read()) + 1
    base = os.path.join(hierarchy.own, f"asynccontainer-{stale_pid}")
    os.makedirs(os.path.join(base, "c1"))
    try:
        _client.shutdown_fork_server()
        assert await ac.call_with_container(["true"], mounts=SYSTEM) == 0
        assert not os.path.exists(base)
    finally:
        if os.path.exists(base):
            os.rmdir(os.path.join(base, "c1"))
            os.rmdir(base)


async def test_service_limits_and_usage() -> None:
    spec = ac.ServiceSpec(["sleep", "300"], limits={"pids": 8, "memory": "64M"}, grace_period=1)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert service.usage is None
        directory = cgroup_dir(service.pid or 0, "pids")
        assert read(directory, "pids.max") == "8"
        await service.stop()
    assert service.usage is not None
    assert service.usage.memory_peak is not None


async def test_bad_limits_fail_before_anything_is_spawned() -> None:
    cases: list[tuple[object, type[Exception], str]] = [
        ({"memory": "lots"}, ValueError, "not a size"),
        ({"memory": 1000}, ValueError, "under 1M"),
        ({"memory": True}, TypeError, "size like"),
        ({"pids": 0}, ValueError, "from 1"),
        ({"cpu": "half"}, TypeError, "CPUs"),
        ({"cpu_weight": 20000}, ValueError, "10000"),
        ({"disk": 1}, ValueError, "unknown limits"),
        ([("pids", 1)], TypeError, "mapping"),
    ]
    for limits, error, message in cases:
        with pytest.raises(error, match=message):
            await ac.run_container(["true"], limits=limits)  # type: ignore[arg-type]
        with pytest.raises(error, match=message):
            ac.ServiceSpec(["true"], limits=limits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'pid' namespace"):
        await ac.run_container(["true"], namespaces=["user", "mnt"], limits={"pids": 8})
    with pytest.raises(ValueError, match="'pid' namespace"):
        ac.ServiceSpec(["true"], namespaces=["mnt"], limits={"pids": 8})


def fork_until_refused() -> int:
    """Fork 30 sleeping children; return how many forks the pids limit refused."""
    children = []
    refused = 0
    for _ in range(30):
        try:
            pid = os.fork()
        except BlockingIOError:
            refused += 1
            continue
        if pid == 0:
            time.sleep(5)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return refused


async def test_an_excursion_is_held_by_the_containers_limits() -> None:
    """An excursion joins the container's cgroups, as docker exec does: its limits apply."""
    limited = await ac.run_container(
        ["sleep", "60"], mounts=ac.HOST_SYSTEM_MAPPINGS, limits={"pids": 10}
    )
    async with limited:
        assert await ac.container_excursion_value(limited, fork_until_refused) >= 15
        # The control: the same excursion into a container without limits forks freely.
        async with await ac.run_container(["sleep", "60"], mounts=ac.HOST_SYSTEM_MAPPINGS) as free:
            assert await ac.container_excursion_value(free, fork_until_refused) == 0
