"""Only the fds asked for reach a container.

Guards against fd leaks into containers, the class of CVE-2024-21626
(runc: an fd of the host's cgroup directory leaked into the container let
it reach the host's file system through /proc/self/fd).
"""

from __future__ import annotations

import os

import anyio
import pytest
from capture import output_of

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


async def test_only_stdio_by_default() -> None:
    """No fd of the caller or of the fork server is open inside."""
    inheritable = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    os.set_inheritable(inheritable, True)
    try:
        returncode, out = await output_of(
            ["sh", "-c", "ls /proc/self/fd"], mounts=SYSTEM, namespaces=["mnt", "pid", "user"]
        )
    finally:
        os.close(inheritable)
    assert returncode == 0
    # 0, 1, 2 and the directory ls opened to list them.
    assert len(out.split()) == 4


async def test_pass_fds_at_their_numbers() -> None:
    import fcntl

    read_end, write_end = os.pipe()
    try:
        # The pipe's write end again, at a free number well above the others.
        target = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 100)
        container = await ac.run_container(
            ["sh", "-c", f"ls /proc/self/fd; echo through-{target} > /proc/self/fd/{target}"],
            mounts=SYSTEM,
            pass_fds=[target],
            stdout=write_end,
        )
        os.close(target)
        os.close(write_end)
        write_end = -1
        async with container:
            with os.fdopen(read_end, "rb") as reader:
                read_end = -1
                data = await anyio.to_thread.run_sync(reader.read)
            assert await container.wait() == 0
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    lines = data.decode().split()
    assert f"through-{target}" in lines
    assert sorted(int(x) for x in lines if x.isdigit()) == sorted([0, 1, 2, 3, target])


@pytest.mark.parametrize(
    ("pass_fds", "error"),
    [([1], ValueError), ([99999], ValueError), (["3"], TypeError), (3, TypeError)],
)
async def test_bad_pass_fds(pass_fds: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="pass_fds"):
        await ac.run_container(["true"], mounts=SYSTEM, pass_fds=pass_fds)  # type: ignore[arg-type]
