"""A PID file the container controls cannot hang the caller's event loop.

`read_pid_file` and services open a path inside the container. A FIFO
there (or a link to a terminal or a device) once blocked the caller's
whole event loop in open(2), forever, under both backends. Now the file is
opened O_PATH first (which never blocks and opens no device), a final
link is not followed, and only a regular file is read; anything else is
"not a PID yet", until the timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


async def ticks_while(
    awaitable_factory: Callable[[], Awaitable[object]], seconds: float
) -> tuple[int, BaseException | None]:
    """Count 10 ms loop ticks while the awaitable runs; return them and what it raised."""
    ticks = 0
    raised: BaseException | None = None

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as group:
        group.start_soon(tick)
        try:
            with anyio.fail_after(seconds):
                await awaitable_factory()
        except BaseException as exc:
            raised = exc
        group.cancel_scope.cancel()
    return ticks, raised


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "plant",
    ["mkfifo /run/d.pid", "ln -s /dev/tty /run/d.pid", "ln -s /dev/zero /run/d.pid"],
    ids=["fifo", "link-to-tty", "link-to-device"],
)
async def test_a_pid_file_that_is_no_regular_file_hangs_nothing(plant: str) -> None:
    async with await ac.run_container(
        ["sh", "-c", f"mkdir -p /run && {plant} && echo ready && exec sleep 60"],
        mounts=SYSTEM,
        writable_root=True,
    ) as box:
        with anyio.fail_after(10):
            while True:
                try:
                    await ac.read_pid_file("/run/d.pid", container=box, timeout=0.1)
                except TimeoutError:
                    break  # planted, and refused
                except ProcessLookupError:
                    raise
        ticks, raised = await ticks_while(
            lambda: ac.read_pid_file("/run/d.pid", container=box, timeout=0.5), 5
        )
    assert isinstance(raised, TimeoutError), raised
    assert "not a regular file" in str(raised) or "cannot be opened" in str(raised)
    assert ticks >= 20  # the loop ran all along (about 50 ticks in 0.5 s)


@pytest.mark.timeout(30)
async def test_a_service_pid_file_that_is_a_fifo_times_out() -> None:
    spec = ac.ServiceSpec(
        ["sh", "-c", "mkfifo /var/run/d.pid; exec sleep 60"],
        pid_file="/var/run/d.pid",
        pid_file_timeout=0.5,
    )
    async with ac.ServiceGroup() as group:
        with anyio.fail_after(10), pytest.raises(TimeoutError, match="not a regular file"):
            await group.start(spec)


async def test_read_pid_file_of_an_exited_container_raises_at_once() -> None:
    box = await ac.run_container(["true"], mounts=SYSTEM)
    async with box:
        with anyio.fail_after(2), pytest.raises(ProcessLookupError):
            # Exited (the pidfd says so), whether or not it was waited for.
            while True:
                await ac.read_pid_file("/run/none.pid", container=box, timeout=30)
        await box.wait()


async def test_read_pid_file_stops_waiting_when_the_container_exits() -> None:
    async with await ac.run_container(["sleep", "0.3"], mounts=SYSTEM) as box:
        with anyio.fail_after(5), pytest.raises(ProcessLookupError, match="exited"):
            await ac.read_pid_file("/run/none.pid", container=box, timeout=30)
