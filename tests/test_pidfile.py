"""read_pid_file: on the host and inside containers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A live process whose PID the files below name."""
    process = subprocess.Popen(["sleep", "300"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


async def write_later(path: Path, chunks: list[tuple[float, str]]) -> None:
    """Write the chunks to one open file, sleeping before each."""
    with path.open("w") as file:
        for delay, text in chunks:
            await anyio.sleep(delay)
            file.write(text)
            file.flush()


async def test_atomic_write(tmp_path: Path, sleeper: int) -> None:
    pid_file = tmp_path / "daemon.pid"

    async def write() -> None:
        await anyio.sleep(0.2)
        scratch = tmp_path / ".daemon.pid.tmp"
        scratch.write_text(f"{sleeper}\n")
        scratch.rename(pid_file)

    async with anyio.create_task_group() as group:
        group.start_soon(write)
        assert await ac.read_pid_file(pid_file, timeout=5) == sleeper


async def test_written_in_two_halves(tmp_path: Path, sleeper: int) -> None:
    pid_file = tmp_path / "daemon.pid"
    text = f"{sleeper}\n"
    async with anyio.create_task_group() as group:
        group.start_soon(write_later, pid_file, [(0.1, text[:2]), (0.5, text[2:])])
        # "12" of "1234\n" must not be taken for PID 12.
        assert await ac.read_pid_file(pid_file, timeout=5) == sleeper


async def test_written_late(tmp_path: Path, sleeper: int) -> None:
    pid_file = tmp_path / "daemon.pid"
    async with anyio.create_task_group() as group:
        group.start_soon(write_later, pid_file, [(1.5, f"{sleeper}\n")])
        started = anyio.current_time()
        assert await ac.read_pid_file(pid_file, timeout=5) == sleeper
        assert anyio.current_time() - started >= 1.5


async def test_written_before_without_newline(tmp_path: Path, sleeper: int) -> None:
    pid_file = tmp_path / "daemon.pid"
    pid_file.write_text(str(sleeper))  # closed: complete even without "\n"
    assert await ac.read_pid_file(pid_file) == sleeper


async def test_never_written_times_out(tmp_path: Path) -> None:
    pid_file = tmp_path / "never.pid"
    started = anyio.current_time()
    with pytest.raises(TimeoutError, match=str(pid_file)):
        await ac.read_pid_file(pid_file, timeout=0.5)
    elapsed = anyio.current_time() - started
    assert 0.5 <= elapsed < 0.5 + 0.2


async def test_empty_file_is_not_yet(tmp_path: Path, sleeper: int) -> None:
    pid_file = tmp_path / "daemon.pid"
    pid_file.write_text("")
    async with anyio.create_task_group() as group:
        group.start_soon(write_later, pid_file, [(0.3, f"{sleeper}\n")])
        assert await ac.read_pid_file(pid_file, timeout=5) == sleeper


async def test_dead_pid_is_not_accepted(tmp_path: Path) -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    pid_file = tmp_path / "stale.pid"
    pid_file.write_text(f"{process.pid}\n")
    with pytest.raises(TimeoutError, match="not alive"):
        await ac.read_pid_file(pid_file, timeout=0.3)


async def test_garbage_is_a_value_error(tmp_path: Path) -> None:
    pid_file = tmp_path / "garbage.pid"
    pid_file.write_text("hello\n")
    with pytest.raises(ValueError, match="'hello', which is not a PID"):
        await ac.read_pid_file(pid_file)


async def test_directory_created_later(tmp_path: Path, sleeper: int) -> None:
    pid_file = tmp_path / "run" / "daemon.pid"

    async def create() -> None:
        await anyio.sleep(0.3)
        pid_file.parent.mkdir()
        pid_file.write_text(f"{sleeper}\n")

    async with anyio.create_task_group() as group:
        group.start_soon(create)
        assert await ac.read_pid_file(pid_file, timeout=5) == sleeper


@pytest.mark.parametrize("seconds", [0, -1, float("nan")])
async def test_bad_timeout(tmp_path: Path, seconds: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        await ac.read_pid_file(tmp_path / "x.pid", timeout=seconds)


# -- inside containers ---------------------------------------------------------


DAEMON = (
    # A daemon that forks, and writes its PID file late and in two halves.
    "mkdir -p /run; "
    "sh -c 'sleep 0.3; pid=$$; "
    "printf %s ${pid%?} > /run/daemon.pid; sleep 0.3; echo ${pid#${pid%?}} >> /run/daemon.pid; "
    "exec sleep 300' & "
    "wait"
)


async def test_daemon_in_a_container_that_forks() -> None:
    async with await ac.run_container(
        ["sh", "-c", DAEMON], mounts=SYSTEM, writable_root=True
    ) as container:
        pid = await ac.read_pid_file("/run/daemon.pid", container=container, timeout=5)
        assert pid != container.pid
        with open(f"/proc/{pid}/status") as status:
            lines = dict(line.split(":", 1) for line in status)
        # Its host PID, alive, inside the container's pid namespace.
        assert lines["State"].split()[0] in "RS"
        assert lines["NSpid"].split()[0] == str(pid)
        assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{container.pid}/ns/pid")
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert cmdline.read().split(b"\0")[:2] == [b"sleep", b"300"]


async def test_container_by_pid_without_pid_namespace(tmp_path: Path) -> None:
    async with await ac.run_container(
        ["sh", "-c", "echo $$ > /run/self.pid; exec sleep 300"],
        mounts=[*SYSTEM, ac.FileSystem("none", "/run", "tmpfs")],
        namespaces=["mnt", "user"],
    ) as container:
        assert await ac.read_pid_file("/run/self.pid", container=container.pid) == container.pid


async def test_path_resolved_inside_the_container(tmp_path: Path) -> None:
    # An absolute symlink inside the container points inside it, not to the host.
    script = "mkdir -p /run /var; ln -s /run /var/run; echo 1 > /run/init.pid; exec sleep 300"
    async with await ac.run_container(
        ["sh", "-c", script], mounts=SYSTEM, writable_root=True
    ) as container:
        assert (
            await ac.read_pid_file("/var/run/init.pid", container=container, timeout=5)
            == container.pid
        )


async def test_directory_missing_inside_the_container_times_out() -> None:
    async with await ac.run_container(["sleep", "300"], mounts=SYSTEM) as container:
        with pytest.raises(TimeoutError, match=r"/no/such/dir/daemon\.pid"):
            await ac.read_pid_file("/no/such/dir/daemon.pid", container=container, timeout=0.4)


async def test_relative_path_with_container_is_a_value_error() -> None:
    async with await ac.run_container(["sleep", "300"], mounts=SYSTEM) as container:
        with pytest.raises(ValueError, match="absolute"):
            await ac.read_pid_file("run/daemon.pid", container=container)


async def test_exited_container_is_process_lookup_error() -> None:
    container = await ac.run_container(["true"], mounts=SYSTEM)
    await container.wait()
    with pytest.raises(ProcessLookupError):
        await ac.read_pid_file("/run/daemon.pid", container=container)


async def test_cancelled_read_leaves_nothing(tmp_path: Path) -> None:
    with anyio.move_on_after(0.2) as scope:
        await ac.read_pid_file(tmp_path / "never.pid", timeout=60)
    assert scope.cancelled_caught
