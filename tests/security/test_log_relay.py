"""A service's output cannot starve, stall or stop the caller.

The log relay runs in the caller's event loop. A service writing as fast
as it can (`yes`) once took the loop for seconds at a time (9 ticks in 4 s
where 400 were due); a long line without a newline cost quadratic time and
unbounded memory (48 MiB: a 21 s stall, +197 MiB); and a log file that
failed (ENOSPC) tore down the whole group. Now the relay yields after every
chunk, finds line ends in new data only, splits lines longer than 64 KiB,
and counts the lines a failing log file drops.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import anyio
import pytest

import asynccontainer as ac
from asynccontainer._services.logs import MAX_LINE


async def ticks_during(seconds: float, interval: float = 0.01) -> int:
    count = 0
    with anyio.move_on_after(seconds):
        while True:
            await anyio.sleep(interval)
            count += 1
    return count


async def test_a_fast_writer_does_not_starve_the_loop() -> None:
    spec = ac.ServiceSpec(["yes", "y" * 200], log_file="/dev/null")
    idle = await ticks_during(1.0)
    async with ac.ServiceGroup() as group:
        await group.start(spec)
        busy = await ticks_during(1.0)
    # Generous: half the ticks an idle loop gets (two cores, and `yes` on one).
    assert busy >= idle // 2, (busy, idle)


async def test_a_long_line_is_split_and_nothing_is_lost(tmp_path: Path) -> None:
    log = tmp_path / "log"
    size = 8 * 1024 * 1024 + 5
    spec = ac.ServiceSpec(
        ["sh", "-c", f"head -c {size} /dev/zero | tr '\\000' x"], log_file=str(log)
    )
    with anyio.fail_after(30):  # it once took seconds per few MiB, quadratically
        async with ac.ServiceGroup() as group:
            service = await group.start(spec)
            assert await service.wait() == 0
    lines = log.read_bytes().split(b"\n")[:-1]
    pieces = [line.split(b" ", 2)[2] for line in lines]
    assert sum(map(len, pieces)) == size
    assert {len(piece) for piece in pieces[:-1]} == {MAX_LINE}
    assert set(b"".join(pieces)) == {ord("x")}


@pytest.fixture
def full_file_system(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 64 KiB tmpfs of the host's, which a service's log fills at once."""
    directory = tmp_path / "small"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "none", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
async def test_a_failing_log_file_stops_nothing(
    full_file_system: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = full_file_system / "log"
    spec = ac.ServiceSpec(
        ["sh", "-c", "i=0; while [ $i -lt 5000 ]; do echo line $i; i=$((i+1)); done; sleep 30"],
        log_file=str(log),
    )
    with caplog.at_level(logging.ERROR, logger="asynccontainer.service"):
        async with ac.ServiceGroup() as group:
            service = await group.start(spec)
            with anyio.fail_after(10):
                while "cannot write to the log file" not in caplog.text:
                    await anyio.sleep(0.01)
            assert service.running
        # The group ended normally: no exception from the log.
    assert "No space left on device" in caplog.text
    assert caplog.text.count("cannot write to the log file") == 1
