"""The benchmark scenarios: each measures asynccontainer beside a baseline, in one run.

Every scenario alternates its variants run by run (A, B, C, A, B, C ...) so
that drift of the machine (other load, frequency scaling, caches) falls on
all of them alike, and reports ratios against the baseline measured in the
same run. Wall-clock numbers are reported, never asserted.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

import asynccontainer as ac
from asynccontainer._core import client as _client

# All namespaces but net, as the issue asks; the same for every variant.
NAMESPACES = ("cgroup", "mnt", "pid", "ipc", "uts", "user")


def bwrap_argv(command: list[str]) -> list[str]:
    """Return bubblewrap's argv for the same isolation as `asynccontainer_kwargs`.

    New user, pid, ipc, uts and cgroup namespaces (mnt is implied), a tmpfs
    root, the host's program directories read-only (links recreated as
    links), /proc and /dev.
    """
    argv = [
        "bwrap",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--tmpfs",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    for item in ac.HOST_SYSTEM_MAPPINGS:
        if isinstance(item, ac.Symlink):
            argv += ["--symlink", item.target, item.path]
        elif isinstance(item, ac.FileSystemMapping):
            argv += ["--ro-bind", item.source, item.target]
    # bwrap leaves the root writable; asynccontainer's default is read-only.
    argv += ["--remount-ro", "/"]
    return [*argv, "--", *command]


def unshare_argv(command: list[str]) -> list[str]:
    """Return util-linux unshare's argv for the same namespaces (no new root).

    unshare(1) has no option to build a root file system; it gets the same
    namespaces and a fresh /proc, so it does less work than the others.
    """
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--pid",
        "--fork",
        "--mount-proc",
        "--ipc",
        "--uts",
        "--cgroup",
        "--",
        *command,
    ]


def asynccontainer_kwargs() -> dict[str, object]:
    """Return the run_container keywords for the benchmark's isolation."""
    return {"namespaces": NAMESPACES, "mounts": ac.HOST_SYSTEM_MAPPINGS}


@dataclass
class Series:
    """The samples of one variant of a scenario, in seconds or bytes."""

    name: str
    values: list[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        """Return the q-quantile (0.5 is the median)."""
        ordered = sorted(self.values)
        if not ordered:
            return float("nan")
        if q == 0.5:
            return statistics.median(ordered)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Result:
    """What a scenario measured: its series, the baseline's name, and notes."""

    scenario: str
    unit: str
    series: list[Series]
    baseline: str
    notes: list[str] = field(default_factory=list)
    higher_is_better: bool = False
    # Series named "NAME xLEVEL" compare with "BASELINE xLEVEL".
    per_level: bool = False
    # Plot on a log axis: the variants differ by orders of magnitude.
    log_axis: bool = False


async def _process(argv: list[str]) -> None:
    await anyio.run_process(argv, check=True, stdout=subprocess.DEVNULL)


async def _ours(command: list[str]) -> None:
    status = await ac.call_with_container(command, **asynccontainer_kwargs())  # type: ignore[arg-type]
    if status != 0:
        raise RuntimeError(f"container exited with {status}")


async def _alternate(variants: dict[str, Callable[[], Awaitable[None]]], runs: int) -> list[Series]:
    series = {name: Series(name) for name in variants}
    for function in variants.values():  # warm up: the server, caches
        await function()
    order = list(variants.items())
    for _ in range(runs):
        # A random order each round: what ran just before (a cache warmed,
        # a CPU woken) falls on every variant alike.
        random.shuffle(order)
        for name, function in order:
            started = time.perf_counter()
            await function()
            series[name].values.append(time.perf_counter() - started)
    return list(series.values())


async def start_to_exit_latency(runs: int) -> Result:
    """Scenario 1: start-to-exit latency of `true`, alternating the variants."""
    true = shutil.which("true") or "/usr/bin/true"
    variants: dict[str, Callable[[], Awaitable[None]]] = {
        "asynccontainer": lambda: _ours([true]),
        "bwrap": lambda: _process(bwrap_argv([true])),
        "unshare (namespaces only)": lambda: _process(unshare_argv([true])),
        "plain subprocess": lambda: _process([true]),
    }
    return Result(
        "start-to-exit latency of `true`",
        "ms",
        await _alternate(variants, runs),
        baseline="bwrap",
    )


async def throughput(levels: tuple[int, ...], per_level: int) -> Result:
    """Scenario 2: containers completed per second at each concurrency level."""
    true = shutil.which("true") or "/usr/bin/true"
    kinds: dict[str, Callable[[], Awaitable[None]]] = {
        "asynccontainer": lambda: _ours([true]),
        "bwrap": lambda: _process(bwrap_argv([true])),
        "plain subprocess": lambda: _process([true]),
    }
    series = [Series(f"{name} x{level}") for level in levels for name in kinds]
    by_name = {s.name: s for s in series}
    for _ in range(3):  # three alternating rounds per level and kind
        for level in levels:
            for name, function in kinds.items():
                total = max(per_level, level)
                limiter = anyio.CapacityLimiter(level)
                started = time.perf_counter()

                async def one(
                    function: Callable[[], Awaitable[None]] = function,
                    limiter: anyio.CapacityLimiter = limiter,
                ) -> None:
                    async with limiter:
                        await function()

                async with anyio.create_task_group() as group:
                    for _ in range(total):
                        group.start_soon(one)
                by_name[f"{name} x{level}"].values.append(total / (time.perf_counter() - started))
    return Result(
        "throughput (containers per second) by concurrency",
        "per s",
        series,
        baseline="bwrap",  # each level against bwrap at the same level
        higher_is_better=True,
        per_level=True,
    )


async def latency_under_memory(runs: int) -> Result:
    """Scenario 3: start latency while the caller holds 50 MB, then 4 GB, resident."""
    true = shutil.which("true") or "/usr/bin/true"
    by_size = {50: Series("caller holding 50 MB"), 4096: Series("caller holding 4 GB")}
    # Blocks alternate (50, 4096, 50, 4096 ...): allocating 4 GB takes
    # seconds, so runs cannot alternate one by one.
    blocks = 4
    for _ in range(blocks):
        for size_mb, series in by_size.items():
            ballast = bytearray(size_mb * 1024 * 1024)
            for offset in range(0, len(ballast), 4096):  # make every page resident
                ballast[offset] = 1
            block = await _alternate({series.name: lambda: _ours([true])}, runs // blocks)
            series.values.extend(block[0].values)
            del ballast
    return Result(
        "start-to-exit latency by the caller's resident memory",
        "ms",
        list(by_size.values()),
        baseline="caller holding 50 MB",
        notes=["The caller never forks: only the fork server (small) does."],
    )


async def excursion_latency(runs: int) -> Result:
    """Scenario 4: container_excursion and container_excursion_value round trips."""
    true = shutil.which("true") or "/usr/bin/true"
    async with await ac.run_container(["sleep", "3600"], **asynccontainer_kwargs()) as box:  # type: ignore[arg-type]
        variants: dict[str, Callable[[], Awaitable[None]]] = {
            "container_excursion(true)": lambda: _excursion(box, [true]),
            "container_excursion_value(lambda: 42)": lambda: _excursion_value(box),
            "nsenter --all (util-linux)": lambda: _process(
                ["nsenter", "-t", str(box.pid), "--all", "--", true]
            ),
        }
        series = await _alternate(variants, runs)
    return Result("excursion latency", "ms", series, baseline="nsenter --all (util-linux)")


async def _excursion(box: ac.Container, command: list[str]) -> None:
    await ac.container_excursion(box, command)


async def _excursion_value(box: ac.Container) -> None:
    assert await ac.container_excursion_value(box, lambda: 42) == 42


async def pid_file_detection(runs: int) -> Result:
    """Scenario 5: delay between an atomic PID-file write and read_pid_file returning."""
    from .pidfile import one_run

    with tempfile.TemporaryDirectory() as directory:
        ours = Series("read_pid_file")
        poll = Series("1 s poll (Shepherd)")
        for index in range(runs):
            ours.values.append(await one_run(directory, "read_pid_file"))
            if index < max(3, runs // 50):
                poll.values.append(await one_run(directory, "poll"))
    return Result(
        "PID-file detection delay",
        "ms",
        [ours, poll],
        baseline="1 s poll (Shepherd)",
        log_axis=True,
    )


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def memory(live: int) -> Result:
    """Scenario 6: the fork server's RSS, and the caller's memory per live container."""
    await _ours([shutil.which("true") or "/usr/bin/true"])
    server = ac._core.client.fork_server()
    server_rss = Series("fork server RSS (KB)", [float(_rss_kb(server.pid))])
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    before = _rss_kb(os.getpid())
    containers = []
    try:
        for _ in range(live):
            containers.append(
                await ac.run_container(["sleep", "3600"], **asynccontainer_kwargs())  # type: ignore[arg-type]
            )
        after = _rss_kb(os.getpid())
        gc.collect()
        traced = (tracemalloc.get_traced_memory()[0] - traced_before) / 1024
        tracemalloc.stop()
        server_with = Series(f"fork server RSS with {live} live (KB)", [float(_rss_kb(server.pid))])
    finally:
        async with anyio.create_task_group() as group:
            for container in containers:
                group.start_soon(container.stop, 0)
    per = Series("caller Python heap per live container (KB)", [traced / live])
    return Result(
        "memory",
        "KB",
        [server_rss, server_with, per],
        baseline=server_rss.name,
        # 1 KB beside 20 MB: on a linear axis the per-container bar is not there.
        log_axis=True,
        notes=[
            f"caller RSS {before} KB before, {after} KB with {live} live containers "
            "(RSS moves by pages; the Python heap is traced with tracemalloc)",
            "each live container also holds 2 fds in the caller (a pidfd, a socket)",
        ],
    )


async def many_services(count: int) -> Result:
    """Scenario 7: `count` services started concurrently in one group, then stopped."""
    peak = [_rss_kb(os.getpid())]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], _rss_kb(os.getpid()))
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as sampler:
        sampler.start_soon(sample)
        started = time.perf_counter()
        async with ac.ServiceGroup() as group:
            async with anyio.create_task_group() as starters:
                for index in range(count):
                    spec = ac.ServiceSpec(["sleep", "3600"], name=f"s{index}", grace_period=1)
                    starters.start_soon(group.start, spec)
            up = time.perf_counter() - started
            peak_caller = _rss_kb(os.getpid())
            stopping = time.perf_counter()
        down = time.perf_counter() - stopping
        sampler.cancel_scope.cancel()
    max_rss = peak[0]
    return Result(
        f"{count} services in one ServiceGroup",
        "s",
        [Series("start all (s)", [up]), Series("stop all (s)", [down])],
        baseline="start all (s)",
        # Kilobytes are no seconds: said, not plotted on the same axis.
        notes=[
            f"caller RSS while running: {peak_caller} KB; caller peak RSS, sampled: {max_rss} KB"
        ],
    )


def _server_cpu() -> float:
    """CPU seconds of the fork server and of the children it reaped (/proc/PID/stat)."""
    server = _client._server
    assert server is not None
    with open(f"/proc/{server.pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime: fields 14 to 17 of proc(5), in ticks.
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """CPU seconds of this process and of the children it reaped."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


async def cpu_per_start(runs: int) -> Result:
    """Scenario 8: CPU per start of `true` (kernel accounting), ours against bwrap.

    Ours: this process, the fork server and the containers it reaped; bwrap:
    this process and the bwrap processes it reaped. In blocks, in a random
    order, since the accounting counts in clock ticks (10 ms).
    """
    true = shutil.which("true") or "/usr/bin/true"
    variants: dict[str, Callable[[], Awaitable[None]]] = {
        "asynccontainer": lambda: _ours([true]),
        "bwrap": lambda: _process(bwrap_argv([true])),
        "plain subprocess": lambda: _process([true]),
    }
    for function in variants.values():
        await function()
    series = {name: Series(name) for name in variants}
    blocks = 10
    per_block = max(1, runs // blocks)
    order = list(variants.items())
    for _ in range(blocks):
        random.shuffle(order)
        for name, function in order:
            before = _own_cpu() + (_server_cpu() if name == "asynccontainer" else 0.0)
            for _ in range(per_block):
                await function()
            after = _own_cpu() + (_server_cpu() if name == "asynccontainer" else 0.0)
            series[name].values.append((after - before) / per_block)
    return Result(
        "CPU per start of `true` (caller, server and container; kernel accounting)",
        "ms",
        list(series.values()),
        baseline="bwrap",
    )


# A fresh process: the time of its first container (the fork server's
# start included), and of its imports, printed as two numbers.
_FIRST_CONTAINER = """
import sys, time
started = time.perf_counter()
import anyio
import asynccontainer as ac
imported = time.perf_counter()

async def main():
    begun = time.perf_counter()
    status = await ac.call_with_container(
        [sys.argv[1]], namespaces=tuple(sys.argv[2].split(",")), mounts=ac.HOST_SYSTEM_MAPPINGS
    )
    assert status == 0, status
    print(time.perf_counter() - begun, imported - started)

anyio.run(main, backend=sys.argv[3])
"""


async def first_container(runs: int) -> Result:
    """Scenario 9: the first container of a fresh process, under both backends.

    Each run is a new interpreter, so the fork server starts each time;
    `bwrap` is its first `true` run as a subprocess of a fresh process.
    """
    true = shutil.which("true") or "/usr/bin/true"
    series = {
        name: Series(name)
        for name in ("first container (asyncio)", "first container (trio)", "imports", "bwrap")
    }
    order = ["asyncio", "trio", "bwrap"]
    for _ in range(runs):
        random.shuffle(order)
        for variant in order:
            if variant == "bwrap":
                started = time.perf_counter()
                await _process(bwrap_argv([true]))
                series["bwrap"].values.append(time.perf_counter() - started)
                continue
            argv = [sys.executable, "-c", _FIRST_CONTAINER, true, ",".join(NAMESPACES), variant]
            output = (await anyio.run_process(argv, check=True)).stdout.split()
            series[f"first container ({variant})"].values.append(float(output[0]))
            if variant == "asyncio":
                series["imports"].values.append(float(output[1]))
    return Result(
        "first container of a fresh process (the fork server's start included)",
        "ms",
        list(series.values()),
        baseline="bwrap",
        notes=["imports: `import anyio, asynccontainer` in the same fresh process, before it"],
    )


def machine() -> str:
    """Describe the machine the numbers come from."""
    import platform

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    memory_kb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    bwrap = subprocess.run(
        ["bwrap", "--version"], check=False, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu}), "
        f"{memory_kb // 1024 // 1024} GiB, Python {sys.version.split()[0]}, {bwrap}"
    )
