"""run_process and open_process: `anyio.run_process` and `anyio.open_process`, in a container.

The same keywords and defaults as anyio's (capture on, `check=True`,
`input=`), the container's options beside them, and the same cancellation
rule as every entry point here: the container is killed and reaped before
the cancellation propagates.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Unpack

import anyio
import anyio.abc

from .._errors import OutputLimitError
from .._spec.container import ContainerOptions, ContainerSpec
from .container import Container, Stdio, run_container

__all__ = ["ContainerProcessError", "open_process", "run_process"]

# How much of a failed process's stderr its message shows (bytes).
_ERROR_TAIL = 2000


class ContainerProcessError(subprocess.CalledProcessError):
    """`run_process` with `check=True`: the container exited with a non-zero returncode.

    A `subprocess.CalledProcessError` (so code written for `anyio.run_process`
    catches it), with `returncode` (-N for signal N), `cmd`, and what was
    captured in `stdout` and `stderr` (None for a stream not captured).
    Its message ends with the last lines of the captured stderr.
    """

    def __str__(self) -> str:
        text = super().__str__()
        if isinstance(self.stderr, bytes) and self.stderr.strip():
            tail = self.stderr[-_ERROR_TAIL:].decode(errors="replace").rstrip()
            text += f" Its stderr ends with:\n{tail}"
        return text


def _check_command(command: object) -> None:
    # A callable is run_container's target too, but it has no output to
    # capture that a command would not have: both are allowed. A string is
    # the classic mistake (anyio runs it through a shell; we never do).
    if isinstance(command, str | bytes):
        raise TypeError(
            f"command must be a sequence of arguments, not the string {command!r}; "
            "for a shell pipeline pass ['sh', '-c', ...] with mounts=ac.HOST_SYSTEM_MAPPINGS"
        )


def _check_max_output(max_output: int | None) -> None:
    if max_output is None:
        return
    if isinstance(max_output, bool) or not isinstance(max_output, int):
        raise TypeError(f"max_output must be a number of bytes or None, not {max_output!r}")
    if max_output < 1:
        raise ValueError(f"max_output must be at least 1 byte, not {max_output}")


async def open_process(
    command: Sequence[str],
    spec: ContainerSpec | None = None,
    *,
    stdin: Stdio = subprocess.PIPE,
    stdout: Stdio = subprocess.PIPE,
    stderr: Stdio = subprocess.PIPE,
    **options: Unpack[ContainerOptions],
) -> Container:
    """Start `command` in a new container with its stdio piped; return the `Container`.

    `anyio.open_process`'s counterpart: `Container.stdin` is an
    `anyio.abc.ByteSendStream`, `.stdout` and `.stderr` are
    `anyio.abc.ByteReceiveStream` objects (None for a stream not piped). Use it
    with `async with` (or `await container.aclose()`), which closes the
    streams and kills and reaps the container if it still runs.

    Args:
        command: the command and its arguments (looked up on the
            container's PATH).
        spec: a `ContainerSpec`; the keywords override its fields.
        stdin: subprocess.PIPE (the default), None for the caller's, an fd,
            a file object or subprocess.DEVNULL.
        stdout: as stdin.
        stderr: as stdin, or subprocess.STDOUT to share stdout's.
        **options: run_container's options.

    Returns:
        The running container.

    Raises:
        OSError: as `run_container` raises it (a failed set-up step, a
            command that cannot be executed).
        ContainerError: as `run_container` raises it.

    Cancellation: the container, if it was created, is killed and reaped
    first.
    """
    _check_command(command)
    return await run_container(command, spec, stdin=stdin, stdout=stdout, stderr=stderr, **options)


async def run_process(
    command: Sequence[str],
    spec: ContainerSpec | None = None,
    *,
    input: bytes | None = None,
    stdin: Stdio = None,
    stdout: Stdio = subprocess.PIPE,
    stderr: Stdio = subprocess.PIPE,
    check: bool = True,
    max_output: int | None = None,
    **options: Unpack[ContainerOptions],
) -> subprocess.CompletedProcess[bytes]:
    """Run `command` in a new container, wait for it, and return what it wrote.

    `anyio.run_process`'s counterpart, with its keywords and defaults:
    stdout and stderr are captured, `input` is written to stdin (then
    closed), and a non-zero returncode raises.

    Args:
        command: the command and its arguments.
        spec: a `ContainerSpec`; the keywords override its fields.
        input: bytes for its stdin; stdin must then be None.
        stdin: None for the caller's (unless `input` is given), an fd, a
            file object, subprocess.DEVNULL or subprocess.PIPE.
        stdout: subprocess.PIPE to capture (the default), or as stdin.
        stderr: as stdout, or subprocess.STDOUT to merge it into stdout.
        check: raise `ContainerProcessError` for a non-zero returncode.
        max_output: at most this many bytes per captured stream; past it
            the container is killed and `OutputLimitError` raised. None
            (the default) captures everything, as anyio does: a container
            that writes without end then fills this process's memory.
        **options: run_container's options.

    Returns:
        A `subprocess.CompletedProcess` with `args`, `returncode` (-N for
        signal N) and the captured `stdout` and `stderr` (None if not captured).

    Raises:
        ContainerProcessError: `check` is true and the returncode is not 0.
        OutputLimitError: a stream passed `max_output`.
        TypeError, ValueError: bad arguments, before anything is spawned.
        OSError, ContainerError: as `run_container` raises them.

    Cancellation: the container is killed and reaped, then the
    cancellation propagates.
    """
    _check_command(command)
    _check_max_output(max_output)
    if input is not None:
        if stdin is not None:
            raise ValueError("pass input or stdin, not both (input is written to a pipe)")
        if not isinstance(input, bytes | bytearray | memoryview):
            raise TypeError(f"input must be bytes, not {type(input).__name__}")
        stdin = subprocess.PIPE
    captured: dict[str, bytearray] = {}
    async with await run_container(
        command, spec, stdin=stdin, stdout=stdout, stderr=stderr, **options
    ) as container:
        over: list[str] = []

        async def drain(name: str, stream: anyio.abc.ByteReceiveStream) -> None:
            buffer = captured[name] = bytearray()
            async for chunk in stream:
                room = max_output - len(buffer) if max_output is not None else len(chunk)
                buffer += chunk[:room]
                if len(chunk) > room:
                    over.append(name)
                    container.kill()
                    return

        async def feed(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
            try:
                await stream.send(bytes(data))
            except anyio.BrokenResourceError:
                pass  # it exited, or closed its stdin, without reading all: as anyio
            finally:
                await stream.aclose()

        async with anyio.create_task_group() as group:
            if container.stdin is not None and input is not None:
                group.start_soon(feed, container.stdin, input)
            for name in ("stdout", "stderr"):
                stream = getattr(container, name)
                if stream is not None:
                    group.start_soon(drain, name, stream)
        returncode = await container.wait()
    out = bytes(captured["stdout"]) if "stdout" in captured else None
    err = bytes(captured["stderr"]) if "stderr" in captured else None
    if over:
        raise OutputLimitError(
            f"the container wrote more than max_output={max_output} bytes to {over[0]}; "
            "it was killed (what was read is in the exception's stdout and stderr)",
            out,
            err,
            max_output or 0,
        )
    if check and returncode != 0:
        raise ContainerProcessError(returncode, list(command), out, err)
    return subprocess.CompletedProcess(list(command), returncode, out, err)
