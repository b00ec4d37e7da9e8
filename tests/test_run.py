"""run_container and call_with_container: the behaviour of Guix's run-container."""

from __future__ import annotations

import errno
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from capture import output_of, sh

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


# -- exit codes and targets ---------------------------------------------------


async def test_exit_code_of_a_command() -> None:
    assert await ac.call_with_container(["sh", "-c", "exit 42"], mounts=SYSTEM) == 42
    assert await ac.call_with_container(["true"], mounts=SYSTEM) == 0


async def test_callable_returning_exits_0_and_raising_exits_1(
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert await ac.call_with_container(lambda: None) == 0

    def fail() -> None:
        raise RuntimeError("boom from inside")

    assert await ac.call_with_container(fail) == 1
    assert "RuntimeError: boom from inside" in capfd.readouterr().err


async def test_closure_sees_its_variables(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    words = ["captured", "by", "a", "closure"]

    def write() -> None:
        Path("/out/marker").write_text(" ".join(words))

    mapping = ac.FileSystemMapping(str(tmp_path), "/out", writable=True)
    assert await ac.call_with_container(write, mounts=[mapping]) == 0
    assert marker.read_text() == "captured by a closure"


async def test_system_exit_code_of_a_callable() -> None:
    def leave() -> None:
        raise SystemExit(7)

    assert await ac.call_with_container(leave) == 7


async def test_killed_container_returns_minus_the_signal() -> None:
    container = await ac.run_container(["sleep", "60"], mounts=SYSTEM)
    container.kill()
    assert await container.wait() == -signal.SIGKILL
    assert container.returncode == -signal.SIGKILL


# -- namespaces --------------------------------------------------------------


async def test_root_inside_by_default() -> None:
    assert await sh("id -u; id -g") == (0, "0\n0\n")


async def test_guest_ids() -> None:
    returncode, out = await sh(
        "id -u; id -g; cat /proc/self/uid_map", guest_uid=1000, guest_gid=100
    )
    assert returncode == 0
    uid, gid, uid_map = out.splitlines()
    assert (uid, gid) == ("1000", "100")
    # The nested namespace that locks the mounts maps the guest id to itself.
    assert uid_map.split() == ["1000", "1000", "1"]


async def test_uid_map_without_lock_mounts_maps_the_callers_uid() -> None:
    returncode, out = await sh("cat /proc/self/uid_map /proc/self/gid_map", lock_mounts=False)
    assert returncode == 0
    assert [line.split() for line in out.splitlines()] == [
        ["0", str(os.geteuid()), "1"],
        ["0", str(os.getegid()), "1"],
    ]


async def test_hostname_in_uts_namespace_leaves_the_hosts_alone() -> None:
    before = socket.gethostname()
    assert await sh("hostname", hostname="inside") == (0, "inside\n")
    assert socket.gethostname() == before


async def test_pid_1_and_2_in_the_pid_namespace() -> None:
    returncode, out = await sh("echo $$; sh -c 'echo $$'")
    assert (returncode, out) == (0, "1\n2\n")


async def test_container_pid_is_the_host_pid_of_pid_1() -> None:
    read_end, write_end = os.pipe()
    container = await ac.run_container(["sh", "-c", "read line"], mounts=SYSTEM, stdin=read_end)
    os.close(read_end)
    async with container:
        with open(f"/proc/{container.pid}/status") as status:
            nspid = next(line for line in status if line.startswith("NSpid:")).split()
        assert nspid[1:] == [str(container.pid), "1"]
        os.write(write_end, b"done\n")
        os.close(write_end)
        assert await container.wait() == 0


async def test_each_namespace_is_new() -> None:
    returncode, out = await sh(
        "for ns in cgroup mnt pid ipc uts user net; do readlink /proc/self/ns/$ns; done"
    )
    assert returncode == 0
    inside = out.split()
    outside = [os.readlink(f"/proc/self/ns/{ns}") for ns in ac.NAMESPACES]
    assert len(inside) == len(ac.NAMESPACES)
    for name, a, b in zip(ac.NAMESPACES, inside, outside, strict=True):
        assert a != b, f"the {name} namespace is the host's"


async def test_shared_namespaces_stay_shared() -> None:
    returncode, out = await sh(
        "readlink /proc/self/ns/net /proc/self/ns/uts", namespaces=["mnt", "pid", "user"]
    )
    assert returncode == 0
    assert out.split() == [os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/uts")]


# -- concurrency -------------------------------------------------------------


async def test_fifty_containers_at_once() -> None:
    results: list[int] = []

    async def one(number: int) -> None:
        results.append(
            await ac.call_with_container(["sh", "-c", f"exit {number % 7}"], mounts=SYSTEM)
        )

    async with anyio.create_task_group() as group:
        for number in range(50):
            group.start_soon(one, number)
    assert sorted(results) == sorted(number % 7 for number in range(50))


# -- environment, cwd, stdio ---------------------------------------------------


async def test_environment_is_purified_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCCONTAINER_SECRET", "do-not-leak")
    assert await output_of(["env"], mounts=SYSTEM) == (0, "")


async def test_environment_is_exactly_the_mapping() -> None:
    assert await output_of(["env"], mounts=SYSTEM, env={"A": "1", "B": "two"}) == (
        0,
        "A=1\nB=two\n",
    )


async def test_cwd() -> None:
    assert await sh("pwd", cwd="/usr") == (0, "/usr\n")


async def test_stdin_from_devnull_and_stdout_to_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with out.open("wb") as file:
        returncode = await ac.call_with_container(
            ["sh", "-c", "cat; echo written"],
            mounts=SYSTEM,
            stdin=subprocess.DEVNULL,
            stdout=file,
        )
    assert returncode == 0
    assert out.read_text() == "written\n"


async def test_no_fd_of_the_caller_or_server_inside() -> None:
    keep = os.open("/dev/null", os.O_RDONLY)  # inheritable, as a careless caller has
    os.set_inheritable(keep, True)
    try:
        returncode, out = await sh("ls /proc/self/fd")
    finally:
        os.close(keep)
    assert returncode == 0
    # 0, 1, 2, and the directory fd ls itself has open.
    assert len(out.split()) == 4


# -- signals, stop, cancellation ----------------------------------------------


async def test_stop_escalates_to_sigkill_for_pid_1_ignoring_sigterm() -> None:
    container = await ac.run_container(["sleep", "60"], mounts=SYSTEM)
    # PID 1 of a pid namespace only gets the signals it handles.
    assert await container.stop(grace=0.2) == -signal.SIGKILL


async def test_stop_with_sigterm_when_handled() -> None:
    """PID 1 with a trap for SIGTERM exits by it.

    The trap is installed before "ready" is printed: the stop waits for
    that line, not for a time (a 0.2 s sleep lost 21 of 40 races).
    """
    read_end, write_end = os.pipe()
    try:
        container = await ac.run_container(
            ["sh", "-c", "trap 'exit 3' TERM; echo ready; while :; do sleep 0.05; done"],
            mounts=SYSTEM,
            stdout=write_end,
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        with anyio.fail_after(10):
            line = await anyio.to_thread.run_sync(reader.readline)
        assert line == b"ready\n"
        assert await container.stop(grace=10) == 3


async def test_terminate_without_pid_namespace() -> None:
    container = await ac.run_container(["sleep", "60"], mounts=SYSTEM, namespaces=["mnt", "user"])
    container.terminate()
    assert await container.wait() == -signal.SIGTERM


async def test_signals_after_exit_are_ignored() -> None:
    container = await ac.run_container(["true"], mounts=SYSTEM)
    assert await container.wait() == 0
    container.kill()
    container.send_signal(signal.SIGTERM)
    assert await container.stop() == 0


async def test_cancelled_wait_leaves_the_container_running() -> None:
    container = await ac.run_container(["sleep", "60"], mounts=SYSTEM)
    async with container:
        with anyio.move_on_after(0.1):
            await container.wait()
        assert container.returncode is None
        assert os.path.exists(f"/proc/{container.pid}")
    assert container.returncode == -signal.SIGKILL


async def test_context_manager_kills_on_leaving() -> None:
    async with await ac.run_container(["sleep", "60"], mounts=SYSTEM) as container:
        pid = container.pid
    assert container.returncode == -signal.SIGKILL
    assert not os.path.exists(f"/proc/{pid}")


async def test_fail_after_kills_and_reaps() -> None:
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.3):
            await ac.call_with_container(["sleep", "60"], mounts=SYSTEM)
    # The leak check after the test proves it was reaped.


async def test_cancellation_during_start_leaves_nothing() -> None:
    # Cancel at every few hundred microseconds of the start-up.
    for delay in [0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016]:
        with anyio.move_on_after(delay):
            await ac.call_with_container(["sleep", "60"], mounts=SYSTEM)


# -- exec failures -------------------------------------------------------------


async def test_missing_command_raises_file_not_found() -> None:
    with pytest.raises(FileNotFoundError) as info:
        await ac.run_container(["no-such-command-here"], mounts=SYSTEM)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "no-such-command-here"


async def test_non_executable_raises_permission_error(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(PermissionError):
        await ac.run_container(
            ["/x/script"], mounts=[*SYSTEM, ac.FileSystemMapping(str(tmp_path), "/x")]
        )


async def test_hundreds_of_containers_at_once() -> None:
    """A burst larger than the control socket's buffer: senders must queue, not fail.

    Several tasks waiting for the same fd to turn writable is an error under
    trio (BusyResourceError); this once broke 500 concurrent services.
    """
    count = 300
    results: list[int] = []

    async def one() -> None:
        results.append(await ac.call_with_container(["true"], mounts=SYSTEM, namespaces=["mnt"]))

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one)
    assert results == [0] * count


CLOSED_STDOUT = """
import os, sys, anyio
import asynccontainer as ac

async def main():
    # The event loop's own fds take the lowest free numbers: 1 among them.
    read, write = os.pipe()
    status = await ac.call_with_container(
        # Python, not a shell: sh's own redirections move fd 1 about.
        ["python3", "-c", "import os; os.write(2, os.readlink('/proc/self/fd/1').encode())"],
        mounts=ac.HOST_SYSTEM_MAPPINGS,
    )
    os.write(2, f"\\nstatus {status}\\n".encode())

anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_caller_started_without_stdout(backend: str) -> None:
    """Its fd 1 is its event loop's (epoll) fd: the container gets /dev/null, the server is fine."""
    result = subprocess.run(
        f"exec {shlex.quote(sys.executable)} -c {shlex.quote(CLOSED_STDOUT)} {backend} >&-",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["/dev/null", "status 0"], result.stderr
