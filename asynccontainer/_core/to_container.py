"""to_container.run_sync: `anyio.to_process.run_sync`, with a fresh container per call.

The function runs in a container of its own (a fork of the fork server,
so nothing is exec'd and no worker is kept), and its value comes back
through a pipe as one pickle, decoded as untrusted data: whatever ran in
the container could have written anything there.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack, cast

import anyio
import attrs
from anyio.lowlevel import RunVar

from .._errors import ContainerError
from .._spec.container import ContainerOptions, ContainerSpec, resolve_spec
from .._wire import Raised, Returned, call_and_send, decode_reply, decode_value
from .client import rebuild_exception
from .container import run_container
from .streams import PipeReceiveStream

__all__ = ["current_default_container_limiter", "run_sync"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# What a value may weigh at most: a container that writes without end must
# not fill the caller's memory.
MAX_VALUE_BYTES = 256 << 20

_default_limiter: RunVar[anyio.CapacityLimiter] = RunVar("asynccontainer_limiter")


def current_default_container_limiter() -> anyio.CapacityLimiter:
    """Return the event loop's default limiter of `run_sync`: one container per CPU.

    As `anyio.to_process.current_default_process_limiter`: its
    `total_tokens` may be changed to allow more at once.
    """
    try:
        return _default_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(os.cpu_count() or 2)
        _default_limiter.set(limiter)
        return limiter


async def _read_all(fd: int) -> bytes:
    """Read the pipe to its end (at most MAX_VALUE_BYTES); the fd stays the caller's to close."""
    stream = PipeReceiveStream(fd)
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > MAX_VALUE_BYTES:
            raise ContainerError(
                f"the container sent more than {MAX_VALUE_BYTES} bytes as its value; "
                "return less (or write it to a mapped file)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def run_sync(
    function: Callable[[Unpack[Ts]], T],
    *args: *Ts,
    spec: ContainerSpec | None = None,
    limiter: anyio.CapacityLimiter | None = None,
    trusted: bool = False,
    **options: Unpack[ContainerOptions],
) -> T:
    """Call `function(*args)` in a fresh container and return its value.

    `anyio.to_process.run_sync`'s counterpart. The function and its
    arguments go in with cloudpickle; the value comes back decoded as
    data (None, bool, int, float, complex, str, bytes, bytearray, tuple,
    list, dict, set, frozenset), since the container could forge it. An
    exception `function` raises is re-raised here with its class (one this
    process has imported), the container's traceback as a note;
    KeyboardInterrupt and SystemExit come as a `ContainerError` whose
    cause they are.

    Args:
        function: a callable; a lambda or a closure will do.
        *args: its positional arguments.
        spec: a `ContainerSpec`; the keywords override its fields.
        limiter: how many may run at once; None for
            `current_default_container_limiter()` (one per CPU).
        trusted: unpickle the value fully, so that values of any class come
            back. A forged value then runs whatever code it names here:
            only for containers whose every process you trust.
        **options: run_container's options (stdin, stdout and stderr are
            the caller's; pass `spec` or keywords for the rest).

    Returns:
        What `function` returned.

    Raises:
        Exception: what `function` raised, of the same class.
        UntrustedValueError: the value (or exception) is not plain data of
            classes this process has, and `trusted` is False.
        ContainerError: the container ended without sending a value (killed,
            out of memory: the message says with which returncode).
        TypeError, ValueError: bad arguments, before anything is spawned.

    Cancellation: the container is killed and reaped, then the
    cancellation propagates; a call waiting for the limiter just stops
    waiting.
    """
    if not callable(function):
        raise TypeError(f"function must be callable, not {function!r}")
    if not isinstance(trusted, bool):
        raise TypeError(f"trusted must be True or False, not {trusted!r}")
    resolved = resolve_spec(spec, options)  # bad options raise before the limiter's wait
    if limiter is None:
        limiter = current_default_container_limiter()
    async with limiter:
        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            passed = attrs.evolve(resolved, pass_fds=(*resolved.pass_fds, write))
            target = functools.partial(call_and_send, write, function, args)
            container = await run_container(target, passed, stdin=subprocess.DEVNULL)
            os.close(write)
            write = -1
            async with container:
                data = await _read_all(read)
                returncode = await container.wait()
        finally:
            os.close(read)
            if write >= 0:
                os.close(write)
    if not data:
        raise ContainerError(
            f"the container exited with {returncode} without sending a value "
            "(killed, or out of memory?)"
        )
    reply = decode_reply(data)
    if isinstance(reply, Returned):
        value = pickle.loads(reply.pickled) if trusted else decode_value(reply.pickled)
        return cast(T, value)
    if isinstance(reply, Raised):
        raise rebuild_exception(reply.error)
    raise ContainerError(f"unexpected message from the container: {reply!r}")
