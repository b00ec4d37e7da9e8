"""A container plan as the C executor reads it: flat, little-endian, no Python objects.

The layout (see `_forkserver/cexecutor.c`): a header of four u32 (the magic
"ACP1", the size of what follows, the fd floor, the number of steps), then
each step as a u32 op, a u32 holding its counts (ints in the low half,
strings in the high half), its ints as i64, and its strings each as a u32
length, 4 bytes of padding, the bytes, a NUL, and padding to 8 bytes. Each
step's fields go in the order its C case reads them.

A plan with a Python target (a callable, a populate hook) has no encoding:
`encode` returns None and the Python executor runs it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import steps

__all__ = [
    "EXECUTOR_VARIABLE",
    "INIT",
    "LIBRARY",
    "MAGIC",
    "PLAN_ROOM",
    "chosen_executor",
    "encode",
    "excursion",
]

# The shared library of the C executor, which the build compiles next to
# the fork server's modules (hatch_build.py), and the room a child has for
# its plan (cexecutor.c's PLAN_ROOM).
LIBRARY = Path(__file__).resolve().parent.parent / "_forkserver" / "_cexecutor.so"
INIT = LIBRARY.with_name("_acinit")
PLAN_ROOM = 1 << 20

# "python" runs every plan in the Python executor (the test suite runs
# under both); unset, the C executor runs what it can when it was built.
EXECUTOR_VARIABLE = "ASYNCCONTAINER_EXECUTOR"

MAGIC = 0x31504341  # "ACP1"
_HEADER = struct.Struct("<4I")
_STEP = struct.Struct("<II")
_STRING = struct.Struct("<I4x")
_NO_VALUE = -1
_U64 = (1 << 64) - 1

Fields = tuple[Sequence[int], Sequence[str | bytes]]


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    padding = -(len(data) + 1) % 8
    return _STRING.pack(len(data)) + data + b"\0" * (1 + padding)


def _optional(value: int | None) -> int:
    return _NO_VALUE if value is None else value


def _mount_file_system(step: steps.MountFileSystem) -> Fields:
    flags = [1 if value is None else 0 for _, value in step.options]
    strings: list[str] = [step.target, step.fstype, step.source]
    for key, value in step.options:
        strings += [key, value or ""]
    ints = [step.attributes, len(step.options), len(step.tolerate), *flags, *step.tolerate]
    return ints, strings


def _set_ids(step: steps.SetIds) -> Fields:
    groups = step.groups or ()
    flag = 0 if step.groups is None else 1
    return [_optional(step.uid), _optional(step.gid), flag, *groups], []


def _argv_and_env(argv: Sequence[str], env: Sequence[tuple[str, str]]) -> list[str]:
    """Return the strings of an exec: its argv, then its environment as NAME=VALUE."""
    return [*argv, *(f"{name}={value}" for name, value in env)]


def _exec(step: steps.Exec) -> Fields:
    return [int(step.send_root), len(step.argv), int(step.listen_pid)], _argv_and_env(
        step.argv, step.env
    )


def _mask(numbers: frozenset[int]) -> int:
    mask = 0
    for number in numbers:
        mask |= 1 << number
    return mask


# The op numbers of cexecutor.c's `enum op`, and each step's fields.
# Any: each encoder takes its own step type.
_ENCODERS: dict[type[steps.Step], tuple[int, Callable[[Any], Fields]]] = {
    steps.Unshare: (1, lambda s: ([s.flags], [])),
    steps.InstallStdio: (2, lambda s: ([], [])),
    steps.SetHostname: (3, lambda s: ([], [s.name])),
    steps.MakeMountsPrivate: (4, lambda s: ([], [])),
    steps.OpenPath: (5, lambda s: ([s.slot, _optional(s.magic)], [s.source])),
    steps.CloneTree: (6, lambda s: ([s.slot, int(s.optional), int(s.nofollow)], [s.source])),
    steps.NewRoot: (7, lambda s: ([_optional(s.slot)], [s.staging, s.tmpfs_mode])),
    steps.MountFileSystem: (8, _mount_file_system),
    steps.Bind: (9, lambda s: ([s.slot, s.attr_set, s.attr_clr], [s.target])),
    steps.SetPropagation: (10, lambda s: ([s.propagation], [s.target])),
    steps.MakeLink: (11, lambda s: ([], [s.link, s.target])),
    steps.ReadOnlyPath: (12, lambda s: ([], [s.target])),
    steps.MaskPath: (13, lambda s: ([s.null_slot], [s.target])),
    steps.PivotRoot: (14, lambda s: ([], [])),
    steps.WriteFile: (15, lambda s: ([s.mode], [s.target, s.content])),
    steps.MakeDirectory: (16, lambda s: ([s.mode], [s.target])),
    steps.RemovePath: (17, lambda s: ([], [s.target])),
    steps.Chmod: (18, lambda s: ([s.mode], [s.target])),
    steps.RemountReadOnly: (19, lambda s: ([], [s.target])),
    steps.BringLoopbackUp: (20, lambda s: ([], [])),
    steps.LockMounts: (21, lambda s: ([s.proc_slot], [])),
    steps.Chdir: (22, lambda s: ([], [s.target])),
    steps.InstallPassedFds: (23, lambda s: (list(s.numbers), [])),
    steps.StartInit: (
        24,
        lambda s: ([int(s.follow_child), int(s.new_session), s.status_fd], []),
    ),
    steps.LimitBoundingSet: (
        25,
        lambda s: ([_mask(s.keep), int(s.required), int(s.keep_across_setuid)], []),
    ),
    steps.StartSession: (26, lambda s: ([], [])),
    steps.SetResourceLimits: (27, lambda s: ([n for limit in s.limits for n in limit], [])),
    steps.SetIds: (28, _set_ids),
    steps.SetUmask: (29, lambda s: ([s.mask], [])),
    steps.SetNoNewPrivs: (30, lambda s: ([], [])),
    steps.KeepCapabilities: (31, lambda s: ([], [])),
    steps.LoadSeccomp: (32, lambda s: ([], [s.program])),
    steps.Exec: (33, _exec),
}

_ENTER = 34

# What cexecutor.c's fixed arrays hold.
_MAX_INTS = 64
_MAX_STRINGS = 512
_MAX_SLOTS = 256


def _pack(op: int, ints: Sequence[int], strings: Sequence[str | bytes]) -> bytes | None:
    """Return one step's record, or None for more fields than the C executor holds."""
    if len(ints) > _MAX_INTS or len(strings) > _MAX_STRINGS:
        return None
    # Two's complement: -1 (None, RLIM_INFINITY) reads back as -1 in C.
    body = b"".join(struct.pack("<Q", n & _U64) for n in ints) + b"".join(map(_string, strings))
    return _STEP.pack(op, len(ints) | len(strings) << 16) + body


def _encode_step(step: steps.Step) -> bytes | None:
    # An init stays in the container for its whole life: the C executor
    # execs it as a program of its own (acinit.c), never leaving it on the
    # fork server's memory. Without that program, the plan runs in Python.
    if isinstance(step, steps.StartInit) and not INIT.exists():
        return None
    encoder = _ENCODERS.get(type(step))
    if encoder is None:
        return None
    slot = getattr(step, "slot", None)
    if isinstance(slot, int) and slot >= _MAX_SLOTS:
        return None
    op, fields = encoder
    return _pack(op, *fields(step))


def encode(plan: steps.ContainerPlan) -> bytes | None:
    """Return the plan as the C executor reads it, or None if it cannot run it.

    None for a step it lacks (a callable target, a populate hook; an init
    when its program was not built), for more fields than it holds, or for
    a plan larger than a child's room for it.
    """
    parts = []
    for step in plan.steps:
        encoded = _encode_step(step)
        if encoded is None:
            return None
        parts.append(encoded)
    body = b"".join(parts)
    if len(body) > PLAN_ROOM:
        return None
    return _HEADER.pack(MAGIC, len(body), plan.fd_floor, len(plan.steps)) + body


def chosen_executor() -> str:
    """Return "c" or "python": the executor plans run in, as the environment and the build allow.

    Raises:
        ValueError: ASYNCCONTAINER_EXECUTOR is set to something else than
            "c" or "python", or to "c" where the C executor was not built.
    """
    wanted = os.environ.get(EXECUTOR_VARIABLE, "")
    if wanted not in ("", "c", "python"):
        raise ValueError(f"{EXECUTOR_VARIABLE} must be 'c' or 'python', not {wanted!r}")
    built = LIBRARY.exists()
    if wanted == "c" and not built:
        raise ValueError(
            f"{EXECUTOR_VARIABLE}=c, but the C executor was not built ({LIBRARY} is missing): "
            "reinstall with a C compiler present, or unset it"
        )
    return "c" if built and wanted != "python" else "python"


def excursion(plan: steps.ExcursionPlan, pid: int) -> tuple[bytes, steps.ContainerPlan] | None:
    """Return a command excursion as the C executor reads it, and the steps its errors name.

    One step joins and execs (the enter program does both, see cexecutor.c's
    enter_step); its errors come as index 0 (joining) or 1 (the exec),
    which the returned plan names. None for a callable, or without the
    enter program.
    """
    if plan.command is None or not INIT.exists():
        return None
    strings = _argv_and_env(plan.command, plan.env)
    body = _pack(_ENTER, [pid, len(plan.command)], strings)
    if body is None or len(body) > PLAN_ROOM:
        return None
    named = steps.ContainerPlan(
        (steps.JoinNamespaces(pid), steps.Exec(plan.command, plan.env)), fd_floor=4
    )
    return _HEADER.pack(MAGIC, len(body), 4, 1) + body, named
