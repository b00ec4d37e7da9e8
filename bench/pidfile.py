"""How long after a PID file is written does read_pid_file return? A benchmark.

Run: python -m bench.pidfile [--runs N]

For each run, a writer task waits a little, then writes the file
atomically (write + rename) and notes the time; read_pid_file, already
waiting, returns, and the delay is the difference. The baseline is the
polling Shepherd does (once a second), run side by side on the same files:
its expected delay is half its period. Both asyncio and trio are measured.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import anyio

import asynccontainer as ac


async def poll_like_shepherd(path: str, period: float = 1.0) -> int:
    """Read the file once per period until it holds a number (the baseline)."""
    while True:
        try:
            with open(path) as file:
                return int(file.read().strip())
        except (FileNotFoundError, ValueError):
            await anyio.sleep(period)


async def one_run(directory: str, reader: str) -> float:
    """Return the delay between one atomic write and `reader` returning."""
    path = os.path.join(directory, "daemon.pid")
    written: list[float] = []

    async def write() -> None:
        await anyio.sleep(random.uniform(0.005, 0.02))
        scratch = path + ".tmp"
        with open(scratch, "w") as file:
            file.write(f"{os.getpid()}\n")
        os.rename(scratch, path)
        written.append(time.perf_counter())

    async with anyio.create_task_group() as group:
        group.start_soon(write)
        if reader == "read_pid_file":
            await ac.read_pid_file(path, timeout=10)
        else:
            await poll_like_shepherd(path)
        returned = time.perf_counter()
    os.unlink(path)
    return returned - written[0]


async def measure(runs: int, baseline_runs: int) -> dict[str, list[float]]:
    """Return the delays of each reader, runs alternating between them."""
    with tempfile.TemporaryDirectory() as directory:
        delays: dict[str, list[float]] = {"read_pid_file": [], "1 s poll (Shepherd)": []}
        # Alternate A and B so drift of the machine affects both alike.
        for index in range(runs):
            delays["read_pid_file"].append(await one_run(directory, "read_pid_file"))
            if index < baseline_runs:
                delays["1 s poll (Shepherd)"].append(await one_run(directory, "poll"))
        return delays


def report(backend: str, delays: dict[str, list[float]]) -> None:
    """Print p50, p99 and the ratio to read_pid_file's p50 for each reader."""
    ours = statistics.median(delays["read_pid_file"])
    for name, values in delays.items():
        values.sort()
        p50 = statistics.median(values) * 1000
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1000
        ratio = statistics.median(values) / ours
        print(
            f"{backend:8} {name:22} runs={len(values):4d}  p50={p50:8.2f} ms  "
            f"p99={p99:8.2f} ms  ratio to read_pid_file p50={ratio:7.1f}x"
        )


def main() -> None:
    """Measure under asyncio and trio and print one line per reader."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--baseline-runs", type=int, default=10)
    arguments = parser.parse_args()
    for backend in ("asyncio", "trio"):
        delays = anyio.run(measure, arguments.runs, arguments.baseline_runs, backend=backend)
        report(backend, delays)


if __name__ == "__main__":
    main()
