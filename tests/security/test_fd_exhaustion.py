"""Running out of file descriptors fails one start, clearly, and harms nothing else.

With the fork server short of fds, a request whose fds did not fit once
arrived truncated (MSG_CTRUNC), the server died, and every running
container died with it. With the caller at its fd limit, a pidfd lost in
transit stalled a start for 30 s, raised a raw OSError and left the
container running with no handle. Now the server refuses a start with
EMFILE while it still has a margin of free fds, never dies of a request,
and a caller that cannot receive a pidfd has the server kill the
container and raises EMFILE at once.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess

import anyio
import pytest
from procfs import fork_server_containers

import asynccontainer as ac
from asynccontainer._core import client as _client

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


@pytest.mark.timeout(60)
async def test_a_fork_server_short_of_fds_refuses_a_start_and_lives_on() -> None:
    assert await ac.call_with_container(["true"], mounts=SYSTEM) == 0
    server = _client._server
    assert server is not None
    in_use = len(os.listdir(f"/proc/{server.pid}/fd"))
    # Room for a few containers only (lowering a limit needs no privilege).
    limit = in_use + 24
    subprocess.run(["prlimit", f"--pid={server.pid}", f"--nofile={limit}:{limit}"], check=True)
    running: list[ac.Container] = []
    try:
        with anyio.fail_after(30):
            while True:
                try:
                    running.append(await ac.run_container(["sleep", "60"], mounts=SYSTEM))
                except OSError as exc:
                    refused = exc
                    break
                assert len(running) < 40, "the server never refused"
        assert refused.errno == errno.EMFILE
        assert "fork server has too few file descriptors" in str(refused)
        assert running, "not one container started"
        assert server.alive()
        # Every container started before still runs, and the server still serves.
        assert all(c.returncode is None for c in running)
        assert set(fork_server_containers()) >= {c.pid for c in running}
        await running.pop().stop(grace=0)
        extra = await ac.run_container(["sleep", "60"], mounts=SYSTEM)
        running.append(extra)
    finally:
        with anyio.CancelScope(shield=True):
            for container in running:
                await container.stop(grace=0)
    ac.shutdown_fork_server()  # a new one starts with the full limit


def fill_fds(free: int) -> list[int]:
    """Open /dev/null until no fd is free, then close `free` of them; return the rest."""
    fillers = []
    while True:
        try:
            fillers.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
            break
    for fd in fillers[-free:]:
        os.close(fd)
    return fillers[:-free]


@pytest.mark.timeout(60)
async def test_a_caller_at_its_fd_limit_fails_starts_at_once_and_leaves_nothing() -> None:
    """Many starts at once with a few fds free: each starts, or fails with EMFILE at once.

    A start frees two of its four socket fds once its request is sent;
    another start may take them before the first receives its pidfd, which
    the kernel then drops (MSG_CTRUNC). That start must fail at once with
    EMFILE, its container killed, not stall for 30 s and leave it running.
    """
    assert await ac.call_with_container(["true"], mounts=SYSTEM) == 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 64, hard))
    fillers = fill_fds(10)
    outcomes: list[str] = []
    try:

        async def start() -> None:
            try:
                container = await ac.run_container(["true"], mounts=SYSTEM)
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                outcomes.append("pidfd" if "pidfd" in str(exc) else "emfile")
                return
            async with container:
                await container.wait()
            outcomes.append("started")

        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                for _ in range(40):
                    group.start_soon(start)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(outcomes) == 40
    assert "started" in outcomes and "emfile" in outcomes, outcomes
    with anyio.fail_after(5):
        while fork_server_containers():
            await anyio.sleep(0.01)
