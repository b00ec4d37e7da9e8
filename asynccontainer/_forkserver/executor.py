"""The Python executor of a container's plan: run the steps in order, report the one that fails.

It holds no policy: each step is dispatched by its type to a runner of
`mounts` or `process`, with the state the earlier steps left. The first
step that raises is reported by its index, with its errno for an OSError
(the caller rebuilds the error naming the user's own path), or with the
exception otherwise; the process then exits. The last step execs or calls
the target and never returns.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import NoReturn

from .._plan import steps
from .._wire import ExceptionInfo, StepFailed
from . import mounts, process
from .process import lift
from .state import State
from .target import EXIT_EXEC_FAILED, EXIT_SETUP_FAILED, report

__all__ = ["run_plan"]

_RUNNERS: dict[type[steps.Step], Callable[[State, steps.Step], None]] = {
    **mounts.RUNNERS,  # type: ignore[dict-item]
    **process.RUNNERS,  # type: ignore[dict-item]
}


def _failure(index: int, exc: BaseException) -> StepFailed:
    text = "".join(traceback.format_exception(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        filename = exc.filename if isinstance(exc.filename, str) else None
        return StepFailed(index, exc.errno, exc.strerror, filename, None, text)
    return StepFailed(index, None, None, None, ExceptionInfo.capture(exc), text)


def run_plan(handshake: socket.socket, plan: steps.ContainerPlan, received: list[int]) -> NoReturn:
    """Execute the plan's steps; never returns (the last step execs or calls)."""
    # Every received fd and the handshake go out of the way of the numbers
    # that stdio and pass_fds will take.
    handshake = socket.socket(
        socket.AF_UNIX, socket.SOCK_STREAM, 0, lift(handshake.detach(), plan.fd_floor)
    )
    state = State(handshake, [lift(fd, plan.fd_floor) for fd in received])
    for index, step in enumerate(plan.steps):
        try:
            _RUNNERS[type(step)](state, step)
        except BaseException as exc:
            report(state.handshake, _failure(index, exc))
            os._exit(EXIT_EXEC_FAILED if isinstance(step, steps.Exec) else EXIT_SETUP_FAILED)
    os._exit(EXIT_SETUP_FAILED)  # a plan that does not end in Exec or Call
