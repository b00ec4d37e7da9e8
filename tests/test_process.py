"""run_process, open_process, piped stdio and to_container.run_sync: shaped like anyio's."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess

import anyio
import pytest

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


# -- run_process --------------------------------------------------------------


async def test_run_process_captures_stdout_and_stderr_apart() -> None:
    result = await ac.run_process(["sh", "-c", "echo out; echo err >&2"], mounts=SYSTEM)
    assert isinstance(result, subprocess.CompletedProcess)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"out\n", b"err\n")
    assert result.args == ["sh", "-c", "echo out; echo err >&2"]


async def test_a_failure_raises_a_called_process_error_with_the_output() -> None:
    with pytest.raises(ac.ContainerProcessError) as caught:
        await ac.run_process(["sh", "-c", "echo partial; echo broken >&2; exit 3"], mounts=SYSTEM)
    error = caught.value
    assert isinstance(error, subprocess.CalledProcessError)
    assert (error.returncode, error.stdout, error.stderr) == (3, b"partial\n", b"broken\n")
    assert "broken" in str(error)  # the message ends with its stderr


async def test_check_false_returns_the_status() -> None:
    result = await ac.run_process(["sh", "-c", "exit 7"], mounts=SYSTEM, check=False)
    assert result.returncode == 7


async def test_input_goes_to_stdin_and_merging_stderr() -> None:
    result = await ac.run_process(
        ["sh", "-c", "cat; echo to-stderr >&2"],
        input=b"hello\n",
        stderr=subprocess.STDOUT,
        mounts=SYSTEM,
    )
    assert (result.stdout, result.stderr) == (b"hello\nto-stderr\n", None)


async def test_a_large_input_to_a_process_that_never_reads_it() -> None:
    """A hostile (or careless) container that exits without reading: no error, no hang."""
    result = await ac.run_process(["true"], input=b"x" * (4 << 20), mounts=SYSTEM)
    assert result.returncode == 0


async def test_max_output_kills_a_container_that_writes_without_end() -> None:
    with pytest.raises(ac.OutputLimitError) as caught:
        await ac.run_process(["yes"], mounts=SYSTEM, max_output=10_000)
    error = caught.value
    assert isinstance(error, ac.ContainerError)
    assert error.stdout is not None and len(error.stdout) == 10_000
    assert set(error.stdout) == set(b"y\n")
    assert "max_output=10000" in str(error)


async def test_cancelling_run_process_kills_and_reaps() -> None:
    with anyio.move_on_after(0.5) as scope:
        await ac.run_process(["sleep", "60"], mounts=SYSTEM)
    assert scope.cancelled_caught  # and the leak check finds nothing left


@pytest.mark.parametrize(
    ("keywords", "error", "text"),
    [
        ({"input": b"x", "stdin": subprocess.DEVNULL}, ValueError, "input or stdin"),
        ({"input": "text"}, TypeError, "input must be bytes"),
        ({"max_output": 0}, ValueError, "max_output"),
        ({"max_output": "1k"}, TypeError, "max_output"),
        ({"stdin": subprocess.STDOUT}, ValueError, "STDOUT is for stderr only"),
    ],
)
async def test_bad_arguments_raise_before_anything_starts(
    keywords: dict[str, object], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        await ac.run_process(["true"], mounts=SYSTEM, **keywords)  # type: ignore[arg-type]


async def test_a_string_command_is_refused() -> None:
    with pytest.raises(TypeError, match="sequence of arguments"):
        await ac.run_process("echo hi", mounts=SYSTEM)  # type: ignore[arg-type]


# -- open_process and piped stdio ---------------------------------------------


async def test_open_process_streams_both_ways() -> None:
    async with await ac.open_process(["cat"], mounts=SYSTEM) as box:
        assert box.stdin is not None and box.stdout is not None and box.stderr is not None
        await box.stdin.send(b"ping\n")
        assert await box.stdout.receive() == b"ping\n"
        await box.stdin.aclose()
        with pytest.raises(anyio.EndOfStream):
            await box.stdout.receive()
        assert await box.wait() == 0


async def test_aclose_kills_a_running_container_and_closes_its_pipes() -> None:
    box = await ac.open_process(["sleep", "60"], mounts=SYSTEM)
    await box.aclose()
    assert box.returncode == -signal.SIGKILL
    assert box.stdout is not None
    with pytest.raises(anyio.ClosedResourceError):
        await box.stdout.receive()


async def test_run_container_accepts_pipe_for_one_stream() -> None:
    async with await ac.run_container(
        ["sh", "-c", "echo only-out"], mounts=SYSTEM, stdout=subprocess.PIPE
    ) as box:
        assert box.stdin is None and box.stderr is None and box.stdout is not None
        assert await box.stdout.receive() == b"only-out\n"
        assert await box.wait() == 0


async def test_a_signal_death_reads_minus_n() -> None:
    async with await ac.open_process(["sleep", "60"], mounts=SYSTEM) as box:
        box.kill()
        assert await box.wait() == -signal.SIGKILL


async def test_a_receive_waiting_on_a_silent_container_is_cancellable() -> None:
    """A container that never writes blocks only the task that reads it."""
    async with await ac.open_process(["sleep", "60"], mounts=SYSTEM) as box:
        assert box.stdout is not None
        with anyio.move_on_after(0.2) as scope:
            await box.stdout.receive()
        assert scope.cancelled_caught


# -- to_container.run_sync ----------------------------------------------------


def _add(a: int, b: int) -> int:
    return a + b


class _Custom:
    pass


async def test_run_sync_returns_the_value() -> None:
    assert await ac.to_container.run_sync(_add, 2, 3) == 5
    assert await ac.to_container.run_sync(os.getpid) == 1  # PID 1 of its own


async def test_run_sync_reraises_the_exception_with_its_class() -> None:
    def fail() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing") as caught:
        await ac.to_container.run_sync(fail)
    assert any("Raised in the container" in note for note in caught.value.__notes__)


async def test_run_sync_a_value_of_a_class_is_not_unpickled_unless_trusted() -> None:
    with pytest.raises(ac.UntrustedValueError):
        await ac.to_container.run_sync(_Custom)
    assert isinstance(await ac.to_container.run_sync(_Custom, trusted=True), _Custom)


class _Forged:
    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (os.system, ("touch /tmp/forged",))


def _forge() -> None:
    """Inside: write a pickle that would run code in the caller to the value pipe, and exit."""
    from asynccontainer._wire import Returned

    payload = pickle.dumps(Returned(pickle.dumps(_Forged())))
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and os.path.exists(f"/proc/self/fd/{name}"):
            try:
                os.write(fd, payload)
            except OSError:
                continue
    os._exit(0)


async def test_a_forged_value_is_refused_as_data() -> None:
    with pytest.raises(ac.UntrustedValueError, match="not plain data"):
        await ac.to_container.run_sync(_forge)


async def test_run_sync_a_container_killed_before_its_value() -> None:
    with pytest.raises(ac.ContainerError, match="exited with 3 without sending a value"):
        await ac.to_container.run_sync(os._exit, 3)


async def test_run_sync_waits_for_its_limiter() -> None:
    limiter = anyio.CapacityLimiter(1)
    results: list[int] = []

    async def call() -> None:
        results.append(await ac.to_container.run_sync(_add, 1, 1, limiter=limiter))

    await limiter.acquire()
    async with anyio.create_task_group() as group:
        group.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        assert limiter.statistics().tasks_waiting == 1 and results == []
        limiter.release()
    assert results == [2]


async def test_cancelling_run_sync_kills_the_container() -> None:
    import time

    with anyio.move_on_after(0.5) as scope:
        await ac.to_container.run_sync(time.sleep, 60)
    assert scope.cancelled_caught
