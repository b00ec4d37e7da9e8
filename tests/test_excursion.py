"""container_excursion and container_excursion_value: Guix's container-excursion(*)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS
NAMESPACE_LINKS = ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")


class CustomError(Exception):
    """Raised inside an excursion; must come back as this very class."""


@pytest.fixture
async def box() -> AsyncIterator[ac.Container]:
    async with await ac.run_container(
        ["sleep", "300"], mounts=SYSTEM, hostname="box", writable_root=True
    ) as container:
        yield container


async def read_output(pid_or_container: int | ac.Container, command: list[str]) -> tuple[int, str]:
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(read_end, "rb") as reader:
            async with anyio.create_task_group() as group:
                result: list[int] = []

                async def run() -> None:
                    try:
                        result.append(
                            await ac.container_excursion(
                                pid_or_container, command, stdout=write_end
                            )
                        )
                    finally:
                        os.close(write_end)

                group.start_soon(run)
                data = await anyio.to_thread.run_sync(reader.read)
    except BaseException:
        raise
    return result[0], data.decode()


async def test_excursion_sees_exactly_the_containers_namespaces(box: ac.Container) -> None:
    def links() -> dict[str, str]:
        return {name: os.readlink(f"/proc/self/ns/{name}") for name in NAMESPACE_LINKS}

    inside = await ac.container_excursion_value(box, links)
    expected = {name: os.readlink(f"/proc/{box.pid}/ns/{name}") for name in NAMESPACE_LINKS}
    assert inside == expected
    assert all(inside[name] != os.readlink(f"/proc/self/ns/{name}") for name in NAMESPACE_LINKS)


async def test_proc_shows_the_containers_processes(box: ac.Container) -> None:
    def processes() -> tuple[str, int, str]:
        with open("/proc/1/cmdline", "rb") as cmdline:
            first = cmdline.read().split(b"\0")[0].decode()
        import socket

        return first, os.getpid(), socket.gethostname()

    first, own_pid, hostname = await ac.container_excursion_value(box, processes)
    assert first.endswith("sleep")
    assert own_pid > 1  # forked again, inside the container's pid namespace
    assert hostname == "box"


async def test_command_excursion_returns_its_status(box: ac.Container) -> None:
    returncode, out = await read_output(box, ["sh", "-c", "hostname; pwd; exit 5"])
    assert (returncode, out) == (5, "box\n/\n")  # Guix: cwd "/"
    # Guix: a purified environment.
    assert await read_output(box, ["env"]) == (0, "")


async def test_excursion_by_plain_pid(box: ac.Container) -> None:
    returncode, out = await read_output(box.pid, ["cat", "/proc/1/comm"])
    assert (returncode, out) == (0, "sleep\n")


async def test_excursion_sees_the_containers_files(box: ac.Container) -> None:
    assert await ac.container_excursion(box, ["sh", "-c", "echo hi > /note"]) == 0
    assert await ac.container_excursion_value(box, lambda: Path("/note").read_text()) == "hi\n"


async def test_value_comes_back(box: ac.Container) -> None:
    offset = 40

    def compute() -> dict[str, object]:
        return {"answer": offset + 2, "uid": os.getuid(), "items": [1, 2, 3]}

    assert await ac.container_excursion_value(box, compute) == {
        "answer": 42,
        "uid": 0,
        "items": [1, 2, 3],
    }


async def test_exception_comes_back_with_its_class(box: ac.Container) -> None:
    def fail() -> None:
        raise CustomError("from inside")

    with pytest.raises(CustomError, match="from inside") as info:
        await ac.container_excursion_value(box, fail)
    assert any("Raised in the container process" in note for note in info.value.__notes__)


async def test_oserror_keeps_its_errno(box: ac.Container) -> None:
    with pytest.raises(FileNotFoundError) as info:
        await ac.container_excursion_value(box, lambda: Path("/no/such/file").read_text())
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "/no/such/file"


async def test_unpicklable_value_is_a_type_error(box: ac.Container) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        await ac.container_excursion_value(box, lambda: __import__("threading").Lock())


async def test_excursion_into_own_process() -> None:
    # Every namespace is shared: no setns at all (joining one's own user
    # namespace would fail with EINVAL).
    assert await ac.container_excursion(os.getpid(), ["sh", "-c", "exit 42"]) == 42
    assert await ac.container_excursion_value(os.getpid(), lambda: 6 * 7) == 42


async def test_excursion_into_a_container_sharing_some_namespaces() -> None:
    async with await ac.run_container(
        ["sleep", "300"], mounts=SYSTEM, namespaces=["mnt", "pid", "user"]
    ) as container:
        links = await ac.container_excursion_value(
            container, lambda: {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACE_LINKS}
        )
    assert links["net"] == os.readlink("/proc/self/ns/net")
    assert links["mnt"] != os.readlink("/proc/self/ns/mnt")


async def test_missing_command_in_excursion(box: ac.Container) -> None:
    with pytest.raises(FileNotFoundError):
        await ac.container_excursion(box, ["no-such-program"])


async def test_excursion_killed_by_a_signal_reports_it(box: ac.Container) -> None:
    returncode = await ac.container_excursion(box, ["sh", "-c", "kill -TERM $$"])
    assert returncode == -signal.SIGTERM


async def test_nonexistent_pid_is_process_lookup_error() -> None:
    process = subprocess.Popen(["true"])
    process.wait()  # reaped: its PID names nothing now (barring reuse)
    with pytest.raises(ProcessLookupError):
        await ac.container_excursion(process.pid, ["true"])


async def test_exited_container_is_process_lookup_error() -> None:
    container = await ac.run_container(["true"], mounts=SYSTEM)
    await container.wait()
    with pytest.raises(ProcessLookupError, match="has exited"):
        await ac.container_excursion(container, ["true"])
    with pytest.raises(ProcessLookupError):
        await ac.container_excursion_value(container, lambda: 1)


async def test_bad_arguments(box: ac.Container) -> None:
    with pytest.raises(TypeError, match="PID or a Container"):
        await ac.container_excursion("1", ["true"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a PID"):
        await ac.container_excursion(0, ["true"])
    with pytest.raises(TypeError, match="callable"):
        await ac.container_excursion_value(box, ["true"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pickled"):
        lock = __import__("threading").Lock()
        await ac.container_excursion_value(box, lambda: lock)


async def test_cancelled_excursion_leaves_nothing(box: ac.Container) -> None:
    with anyio.move_on_after(0.3) as scope:
        await ac.container_excursion(box, ["sleep", "60"])
    assert scope.cancelled_caught

    with anyio.move_on_after(0.3) as scope:
        await ac.container_excursion_value(box, lambda: __import__("time").sleep(60))
    assert scope.cancelled_caught

    # The excursions' processes were killed: only the container's own
    # process (and at most a killed excursion's child the fork server has
    # not reaped yet, a zombie) remain in its pid namespace.
    def live_processes() -> list[int]:
        return sorted(
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit() and Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"
        )

    running = await ac.container_excursion_value(box, live_processes)
    assert len(running) == 2  # PID 1 and the excursion asking


async def test_cancellation_at_many_points(box: ac.Container) -> None:
    for delay in [0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032]:
        with anyio.move_on_after(delay):
            await ac.container_excursion_value(box, lambda: __import__("time").sleep(60))


async def test_excursion_process_is_not_dumpable(box: ac.Container) -> None:
    """The container's processes hold CAP_SYS_PTRACE in its user namespace.

    An excursion that could be traced from inside could be made to send the
    caller a forged pickle; not dumpable, it can only be traced with the
    capability in the host's user namespace.
    """

    def dumpable() -> int:
        from asynccontainer import _kernel

        return _kernel.prctl(_kernel.PR_GET_DUMPABLE)

    assert await ac.container_excursion_value(box, dumpable) == 0


async def test_excursion_killed_with_its_container_reports_sigkill() -> None:
    """The container's end SIGKILLs the excursion's command: -9, not an error of the helper."""
    container = await ac.run_container(["sleep", "60"], mounts=ac.HOST_SYSTEM_MAPPINGS)
    async with container, anyio.create_task_group() as group:
        results: list[int] = []

        async def enter() -> None:
            results.append(await ac.container_excursion(container.pid, ["sleep", "30"]))

        group.start_soon(enter)
        await anyio.sleep(0.5)
        container.kill()
    assert results == [-9]


# The caller as a subreaper that never reaps stands for a caller that is
# PID 1 of its own container (a Python app in Docker): an orphan goes to
# it unless the fork server adopts it.
ORPHANING_CALLER = """
import anyio
import asynccontainer as ac
from asynccontainer import _kernel

_kernel.prctl(_kernel.PR_SET_CHILD_SUBREAPER, 1)

async def main():
    async with await ac.run_container(["sleep", "60"], mounts=ac.HOST_SYSTEM_MAPPINGS) as box:
        with anyio.move_on_after(0.3):
            await ac.container_excursion_value(box, lambda: __import__("time").sleep(60))
        box.kill()
        with anyio.fail_after(10):
            print(await box.wait())

anyio.run(main, backend=BACKEND)
"""


@pytest.mark.timeout(60)
def test_a_killed_excursion_leaves_no_orphan_to_the_callers_init(anyio_backend: str) -> None:
    """A killed excursion's child is reaped by the fork server, so the container still ends.

    A container's PID 1 dying waits until every process of its namespace is
    reaped (zap_pid_ns_processes); the excursion's orphaned child, given to
    a caller that never reaps, kept wait() and stop() waiting forever.
    """
    script = f"BACKEND = {anyio_backend!r}\n{ORPHANING_CALLER}"
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=45
    )
    assert (result.returncode, result.stdout) == (0, "-9\n"), result.stderr
