"""Excursions: run a command or a callable inside a running container's namespaces.

Guix's container-excursion and container-excursion*. The excursion process
is cloned by the fork server like a container (the caller is never forked);
it joins the target's namespaces with one setns(pidfd, flags), chdirs to
"/", and forks once more so the pid namespace applies (setns(2): a new pid
namespace only takes effect for children). The target runs in that second
child, whose status or value comes back to the caller.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Mapping
from typing import TypeVar, cast

from .. import _kernel
from .._errors import ContainerError
from .._plan import encode
from .._plan.build import check_command, pickle_callable
from .._plan.steps import ContainerPlan, ExcursionPlan
from .._spec.checks import environment
from .._wire import ExcursionSetup, Raised, Returned, SetupFailed, SpawnRequest, decode_value
from .client import AsyncFrameChannel, rebuild_exception
from .container import (
    Container,
    Stdio,
    Target,
    _StdioFds,
    await_ready,
    next_reply,
    start_process,
)

__all__ = ["container_excursion", "container_excursion_value"]

T = TypeVar("T")


def _target_pidfd(pid_or_container: int | Container) -> tuple[int, bool]:
    """Return a pidfd for the process to enter, and whether it was opened here (to close)."""
    if isinstance(pid_or_container, Container):
        pidfd = pid_or_container._pidfd
        if pid_or_container.returncode is not None or pidfd is None:
            raise ProcessLookupError(
                3, f"{pid_or_container!r} has exited; there is nothing to enter"
            )
        return pidfd, False
    if isinstance(pid_or_container, bool) or not isinstance(pid_or_container, int):
        raise TypeError(f"expected a PID or a Container, not {pid_or_container!r}")
    if pid_or_container <= 0:
        raise ValueError(f"{pid_or_container} is not a PID")
    try:
        return _kernel.pidfd_open(pid_or_container), True
    except ProcessLookupError:
        raise ProcessLookupError(
            3, f"no process with PID {pid_or_container} (it may have exited)"
        ) from None


def _config(target: Target, env: Mapping[str, str] | None, want_value: bool) -> ExcursionPlan:
    if callable(target):
        return ExcursionPlan(
            env=environment("env", env) or (),
            command=None,
            pickled_callable=pickle_callable("target", target),
            want_value=want_value,
            sys_path=tuple(sys.path),
        )
    return ExcursionPlan(
        env=environment("env", env) or (),
        command=check_command(target),
        pickled_callable=None,
        want_value=False,
        sys_path=(),
    )


async def _start(
    pid_or_container: int | Container,
    config: ExcursionPlan,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> tuple[Container, AsyncFrameChannel, ContainerPlan | None]:
    """Start the excursion process; return it, its handshake, and the steps its errors name.

    A command runs in the C executor where it was built (the plan then
    names the join and the exec, for `await_ready`).
    """
    pidfd, opened = _target_pidfd(pid_or_container)
    stdio = _StdioFds()
    try:
        stdio.add("stdin", 0, stdin)
        stdio.add("stdout", 1, stdout)
        stdio.add("stderr", 2, stderr)
        # A plain fork of the server (no new namespace, no id maps), in the
        # container's cgroups if the server made it some.
        target_pid = (
            pid_or_container.pid if isinstance(pid_or_container, Container) else pid_or_container
        )
        request = SpawnRequest(clone_flags=0, id_map=None, cgroup_of=target_pid)
        setup: object = ExcursionSetup(config)
        named = None
        encoded = encode.excursion(config, target_pid) if encode.chosen_executor() == "c" else None
        if encoded is not None:
            setup, named = encoded
            request = request._replace(executor="c")
        process, handshake = await start_process(request, setup, [*stdio.fds, pidfd])
        return process, handshake, named
    finally:
        stdio.close()
        if opened:
            os.close(pidfd)


async def container_excursion(
    pid_or_container: int | Container,
    target: Target,
    *,
    env: Mapping[str, str] | None = None,
    stdin: Stdio = None,
    stdout: Stdio = None,
    stderr: Stdio = None,
) -> int:
    """Run `target` in the namespaces of a running process and return its returncode.

    The namespaces are joined user first and mnt last, and those the caller
    already shares are not joined (so an excursion into one's own process
    calls no setns at all). The target runs with an empty environment
    (unless `env` gives one) and "/" as its working directory, as PID 2 or
    more of the target's pid namespace.

    Args:
        pid_or_container: a `Container`, or the host PID of any process the
            caller may enter.
        target: a command (sequence of str) or a callable taking no arguments.
        env: the environment; None for an empty one (Guix purifies it).
        stdin: None to share the caller's, an fd, a file object or
            subprocess.DEVNULL.
        stdout: as stdin.
        stderr: as stdin.

    Returns:
        The exit code, or -N if signal N ended the target.

    Raises:
        ProcessLookupError: the process does not exist or has exited.
        PermissionError: the caller may not enter its namespaces.
        FileNotFoundError: the command does not exist there.
        TypeError, ValueError: bad arguments, before anything is spawned.

    Cancellation: the excursion is killed and reaped before the cancellation
    propagates.
    """
    config = _config(target, env, want_value=False)
    process, handshake, named = await _start(pid_or_container, config, stdin, stdout, stderr)
    async with process:
        try:
            await await_ready(process, handshake, named)
        finally:
            handshake.close()
        return await process.wait()


async def container_excursion_value(
    pid_or_container: int | Container,
    fn: Callable[[], T],
    *,
    env: Mapping[str, str] | None = None,
    stdin: Stdio = None,
    stdout: Stdio = None,
    stderr: Stdio = None,
    trusted: bool = False,
) -> T:
    """Run `fn()` in the namespaces of a running process and return its value.

    The process that runs `fn` is inside the container's namespaces, and so
    in the container's hands: it imports nothing once there (the container's
    files would be the modules), and what it sends back is decoded as
    *data*: None, bool, int, float, complex, str, bytes, bytearray, tuple,
    list, dict, set, frozenset. If `fn` raises, an exception of a class this
    process has already imported is raised here as itself (its errno for an
    OSError), with the traceback from inside as a note; KeyboardInterrupt
    and SystemExit come as a ContainerError whose cause they are. Everything
    else is as for `container_excursion`.

    Args:
        pid_or_container: a `Container`, or the host PID of any process the
            caller may enter.
        fn: a callable taking no arguments (sent with cloudpickle).
        env: the environment; None for an empty one.
        stdin: None to share the caller's, an fd, a file object or
            subprocess.DEVNULL.
        stdout: as stdin.
        stderr: as stdin.
        trusted: unpickle the value fully (cloudpickle's format), so that
            values of any class come back. A container can forge the value,
            and unpickling a forged one runs whatever code it names in this
            process: pass True only for containers whose every process you
            trust.

    Raises:
        Exception: the exception `fn` raised, of the same class.
        UntrustedValueError: the value (or the exception) is not plain data
            of classes this process has, and `trusted` is False.
        TypeError: if `fn` or its value cannot be pickled.
        ProcessLookupError: as for `container_excursion`.
        PermissionError: as for `container_excursion`.

    Cancellation: the excursion is killed and reaped before the cancellation
    propagates.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments, not {fn!r}")
    if not isinstance(trusted, bool):
        raise TypeError(f"trusted must be True or False, not {trusted!r}")
    config = _config(fn, env, want_value=True)
    process, handshake, _ = await _start(pid_or_container, config, stdin, stdout, stderr)
    async with process:
        try:
            while True:
                reply = await next_reply(handshake)
                if reply is None:
                    returncode = await process.wait()
                    raise ContainerError(
                        f"the excursion process ended with status {returncode} without "
                        "sending a value (killed from outside?)"
                    )
                if isinstance(reply, Returned):
                    await process.wait()
                    value = pickle.loads(reply.pickled) if trusted else decode_value(reply.pickled)
                    return cast(T, value)
                if isinstance(reply, Raised | SetupFailed):
                    await process.wait()
                    raise rebuild_exception(reply.error)
        finally:
            handshake.close()
