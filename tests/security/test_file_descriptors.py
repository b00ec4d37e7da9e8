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


@pytest.mark.parametrize("number", [3, 4, 5, 7, 10])
async def test_a_leaked_fd_used_as_cwd_reaches_nothing(number: int) -> None:
    """runc's CVE-2024-21626: cwd=/proc/self/fd/N once reached the host through a leaked fd.

    The caller has directories of the host open at those numbers (its own,
    inheritable); the container has none of them (at most its handshake
    socket, during the set-up), so the working directory cannot be set
    there, and the start fails naming the path.
    """
    opened = []
    try:
        while len(opened) < 12:
            fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
            os.set_inheritable(fd, True)
            opened.append(fd)
        path = f"/proc/self/fd/{number}"
        with pytest.raises((FileNotFoundError, NotADirectoryError)) as info:
            await ac.run_container(["true"], mounts=SYSTEM, cwd=path)
        assert info.value.filename == path
    finally:
        for fd in opened:
            os.close(fd)


async def test_a_callable_holds_no_fd_of_the_set_up() -> None:
    """A callable runs in the process that set the container up: nothing of that is left open."""

    def fds() -> None:
        names = os.listdir("/proc/self/fd")  # its own fd is among them while it lists
        print(len(names))

    returncode, out = await output_of(fds, mounts=SYSTEM)
    assert (returncode, out) == (0, "4\n")
