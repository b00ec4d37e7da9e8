"""The C executor: chosen when built, its children's mappings freed, the Python one otherwise.

The whole suite runs under both executors (noxfile.py); these are what is
particular to the C one: its failures say where they came from, the
memory its CLONE_VM children run on goes back to the server at their exec
(or at the exit of an init that stays on it), and an install without a
compiler falls back to Python.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import asynccontainer as ac
from asynccontainer._core import client as _client
from asynccontainer._plan import encode

REPOSITORY = Path(__file__).resolve().parent.parent
SYSTEM = ac.HOST_SYSTEM_MAPPINGS
C = os.environ.get(encode.EXECUTOR_VARIABLE) != "python"


def child_mappings() -> int:
    """Count the fork server's C children's stacks: 1 MiB read-write between guard pages.

    (cexecutor.c's ac_map: guard, plan, guard, stack, guard; the guards keep
    the kernel from merging the regions with their neighbours.)
    """
    server = _client._server
    assert server is not None
    regions = []
    with open(f"/proc/{server.pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(part, 16) for part in fields[0].split("-"))
            regions.append((start, end, fields[1], len(fields) == 5))
    count = 0
    for before, (start, end, mode, anonymous), after in zip(
        regions, regions[1:], regions[2:], strict=False
    ):
        guarded = before[1] == start and after[0] == end and before[2] == after[2] == "---p"
        count += guarded and anonymous and mode == "rw-p" and end - start == 1 << 20
    return count // 2  # the plan's room and the stack


async def settled(expected: int) -> int:
    """Wait (5 s at most) until the server holds `expected` child mappings; return the count."""
    with anyio.move_on_after(5):
        while child_mappings() != expected:
            await anyio.sleep(0.005)
    return child_mappings()


async def test_a_failure_says_which_executor_ran_the_step(tmp_path: Path) -> None:
    mapping = ac.FileSystemMapping(str(tmp_path / "missing"), "/data")
    with pytest.raises(FileNotFoundError) as info:
        await ac.call_with_container(["true"], mounts=[*SYSTEM, mapping])
    notes = "\n".join(info.value.__notes__)
    assert ("(in the C executor)" in notes) == C, notes
    assert info.value.filename == str(tmp_path / "missing") or "/data" in str(info.value)


async def test_a_childs_mapping_goes_back_to_the_server_at_its_exec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(encode.EXECUTOR_VARIABLE, "c")  # in the Python executor's run too
    assert await ac.call_with_container(["true"], mounts=SYSTEM) == 0
    before = await settled(0)
    assert before == 0
    containers = [await ac.run_container(["sleep", "60"], mounts=SYSTEM) for _ in range(5)]
    try:
        # Ready means exec'd: their mappings are freed, while they run.
        assert await settled(0) == 0
    finally:
        for container in containers:
            await container.stop(grace=0)
    for _ in range(50):
        assert await ac.call_with_container(["true"], mounts=SYSTEM) == 0
    assert await settled(0) == 0


async def test_a_container_with_an_init_never_runs_on_the_servers_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An init stays for the container's life: the C executor's is a program exec'd of its own.

    With capabilities=None the target holds every capability its init
    holds, so ptrace's checks let it open /proc/1/mem (the class of runc's
    CVE-2016-9962): an init left on the fork server's memory would give the
    container the server. PID 1 is ac-init, on no mapping of the server's.
    """
    monkeypatch.setenv(encode.EXECUTOR_VARIABLE, "c")
    out = tmp_path / "out"
    with out.open("wb") as file:
        async with await ac.run_container(
            ["sh", "-c", "cat /proc/1/comm; exec sleep 60"],
            mounts=SYSTEM,
            child_is_pid1=False,
            capabilities=None,
            stdout=file,
        ) as container:
            with anyio.fail_after(10):
                while not out.read_text().endswith("\n"):
                    await anyio.sleep(0.005)
            assert child_mappings() == 0
            container.terminate()
            # The init relays SIGTERM to the target, which dies of it: -15,
            # as without an init (the init exits 128+15 and says why).
            assert await container.wait() == -signal.SIGTERM
    assert out.read_text() == "ac-init\n"


async def test_a_services_init_follows_its_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon whose parent exits: the C executor's init stays while any process is left."""
    monkeypatch.setenv(encode.EXECUTOR_VARIABLE, "c")
    spec = ac.ServiceSpec(
        ["sh", "-c", "sleep 60 & echo $! > /var/run/d.pid"], pid_file="/var/run/d.pid"
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert service.pid is not None
        assert child_mappings() == 0


def test_without_a_compiler_the_install_falls_back_to_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build hook finds no compiler: nothing is built, and plans run in Python."""
    sys.path.insert(0, str(REPOSITORY))
    try:
        import hatch_build
    finally:
        sys.path.remove(str(REPOSITORY))
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    (tmp_path / "asynccontainer" / "_forkserver").mkdir(parents=True)
    assert hatch_build.compiler() is None
    assert not hatch_build.build(tmp_path)
    assert not (tmp_path / hatch_build.LIBRARY).exists()
    monkeypatch.setattr(encode, "LIBRARY", tmp_path / hatch_build.LIBRARY)
    monkeypatch.delenv(encode.EXECUTOR_VARIABLE, raising=False)
    assert encode.chosen_executor() == "python"
    monkeypatch.setenv(encode.EXECUTOR_VARIABLE, "c")
    with pytest.raises(ValueError, match="the C executor was not built"):
        encode.chosen_executor()


def test_a_bad_executor_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(encode.EXECUTOR_VARIABLE, "rust")
    with pytest.raises(ValueError, match="must be 'c' or 'python', not 'rust'"):
        encode.chosen_executor()


def test_the_build_compiles_the_library_and_the_init_it_loads(tmp_path: Path) -> None:
    """The hook's compile, from the checkout: the library loads, the init runs as a program."""
    forkserver = tmp_path / "asynccontainer" / "_forkserver"
    forkserver.mkdir(parents=True)
    for source in (REPOSITORY / "asynccontainer" / "_forkserver").glob("*.[ch]"):
        (forkserver / source.name).write_bytes(source.read_bytes())
    script = (
        "import sys, ctypes; sys.path.insert(0, sys.argv[1]); import hatch_build; "
        "from pathlib import Path; root = Path(sys.argv[2]); assert hatch_build.build(root); "
        "lib = ctypes.CDLL(str(root / hatch_build.LIBRARY)); print(lib.ac_spawn.__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(REPOSITORY), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ac_spawn" in result.stdout
    # Static, without libc: it follows a child and exits with its status.
    init = forkserver / "_acinit"
    follow = subprocess.run(["sh", "-c", f'sh -c "exit 5" & exec {init} $!'], check=False)
    assert follow.returncode == 5
    # No program interpreter named: nothing of the host's libc is needed.
    assert init.read_bytes()[:4] == b"\x7fELF"
    assert b"ld-linux" not in init.read_bytes()


async def test_a_command_excursion_runs_in_c_from_outside_the_pid_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enter program joins, forks, and waits outside: inside, the command's parent is 0.

    The waiting process holds the caller's handshake; it is not dumpable and
    not in the container's pid namespace, so nothing inside can reach it.
    A failing command is named, with where it failed.
    """
    monkeypatch.setenv(encode.EXECUTOR_VARIABLE, "c")
    out = tmp_path / "out"
    async with await ac.run_container(["sleep", "60"], mounts=SYSTEM) as box:
        with out.open("wb") as file:
            command = ["sh", "-c", "grep ^PPid: /proc/$$/status; exit 7"]
            assert await ac.container_excursion(box, command, stdout=file) == 7
        with pytest.raises(FileNotFoundError) as info:
            await ac.container_excursion(box, ["no-such-command"])
        assert info.value.filename == "no-such-command"
        assert "(in the C executor)" in "\n".join(info.value.__notes__)
        await box.stop(grace=0)
    assert out.read_text().split() == ["PPid:", "0"]


def test_a_c_record_from_inside_is_decoded_as_data() -> None:
    """What the C executor sends is fixed records; a malformed one is refused, never run."""
    import struct

    from asynccontainer._errors import UntrustedValueError
    from asynccontainer._wire import Execing, StepFailed, decode_reply

    assert decode_reply(b"ACX1") == Execing()
    failed = decode_reply(b"ACF1" + struct.pack("<iiq", 3, 2, 0))
    assert isinstance(failed, StepFailed)
    assert (failed.step, failed.errno, failed.detail) == (3, 2, 0)
    for forged in (b"ACF1", b"ACF1" + b"\0" * 40, b"ACX1 and more"):
        with pytest.raises(UntrustedValueError):
            decode_reply(forged)
