"""The plan's rules, checked in the caller without spawning anything.

Every decision about a container is taken in `plan_container`; the child
only executes the steps. So the rules can be read off the plan: which
steps, in which order, with which values.
"""

from __future__ import annotations

import os
import pickle

import pytest

import asynccontainer as ac
from asynccontainer._core import client as _client
from asynccontainer._plan import steps
from asynccontainer._plan.build import MASKED_PATHS, READ_ONLY_PATHS, Extras, plan_container

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


def plan_of(target: object = ("true",), **options: object) -> list[steps.Step]:
    spec = ac.ContainerSpec(**options)  # type: ignore[arg-type]
    command = list(target) if isinstance(target, tuple) else target
    plan, _ = plan_container(spec, command)  # type: ignore[arg-type]
    return list(plan.steps)


def kinds(plan: list[steps.Step]) -> list[str]:
    return [type(step).__name__ for step in plan]


def test_planning_spawns_nothing() -> None:
    ac.shutdown_fork_server()
    plan_of(mounts=SYSTEM, hostname="box", limits={})
    assert _client._server is None


def test_host_paths_are_opened_before_the_root_and_mounts_go_beneath_it() -> None:
    plan = plan_of(mounts=[*SYSTEM, ac.FileSystemMapping("/etc/hostname", "/x")])
    names = kinds(plan)
    root = names.index("NewRoot")
    assert all(i < root for i, name in enumerate(names) if name in ("CloneTree", "OpenPath"))
    assert all(i > root for i, name in enumerate(names) if name in ("Bind", "MountFileSystem"))
    assert names.index("PivotRoot") > max(i for i, n in enumerate(names) if n == "Bind")


def test_masks_come_after_every_mount_and_before_pivot_root() -> None:
    plan = plan_of(mounts=[*SYSTEM, ac.FileSystem("proc", "/proc", "proc")])
    names = kinds(plan)
    last_mount = max(i for i, n in enumerate(names) if n in ("Bind", "MountFileSystem"))
    masks = [i for i, n in enumerate(names) if n in ("MaskPath", "ReadOnlyPath")]
    assert min(masks) > last_mount and max(masks) < names.index("PivotRoot")
    covered = {step.path for step in plan if isinstance(step, steps.MaskPath | steps.ReadOnlyPath)}
    assert covered == {*MASKED_PATHS, *READ_ONLY_PATHS}
    assert "/proc/sys" in READ_ONLY_PATHS and "/proc/kcore" in MASKED_PATHS


def test_without_a_mount_namespace_there_is_no_mount_step() -> None:
    plan = plan_of(namespaces=["pid", "uts"])
    mounting = {"MakeMountsPrivate", "CloneTree", "NewRoot", "Bind", "PivotRoot", "MaskPath"}
    assert not mounting & set(kinds(plan))


def test_the_order_of_the_privilege_steps() -> None:
    """no_new_privs first lets the filter load without CAP_SYS_ADMIN; else the filter first."""
    with_nnp = kinds(plan_of())
    assert with_nnp[-4:] == ["SetNoNewPrivs", "KeepCapabilities", "LoadSeccomp", "Exec"]
    without = kinds(plan_of(no_new_privs=False))
    assert without[-3:] == ["LoadSeccomp", "KeepCapabilities", "Exec"]
    assert "LoadSeccomp" not in kinds(plan_of(seccomp=None))
    assert "KeepCapabilities" not in kinds(plan_of(capabilities=None))


def test_an_init_only_when_asked_and_with_a_pid_namespace() -> None:
    assert "StartInit" not in kinds(plan_of())
    [init] = [s for s in plan_of(child_is_pid1=False) if isinstance(s, steps.StartInit)]
    assert init.follow_child
    spec = ac.ContainerSpec(namespaces=["mnt", "pid"])
    plan, _ = plan_container(spec, ["true"], extras=Extras(init_for_all=True))
    [init] = [s for s in plan.steps if isinstance(s, steps.StartInit)]
    assert not init.follow_child


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is a root caller's")
def test_a_root_caller_loses_the_capabilities_that_leave_privilege_behind() -> None:
    [limit] = [s for s in plan_of() if isinstance(s, steps.LimitBoundingSet)]
    # CAP_FSETID is 4, CAP_SETFCAP 31 (<linux/capability.h>).
    assert len(limit.keep) == len(ac.DEFAULT_CAPABILITIES) - 2
    assert not limit.keep & {4, 31} and not limit.required
    own = plan_of(capabilities={"CAP_SETFCAP"})
    [named] = [s for s in own if isinstance(s, steps.LimitBoundingSet)]
    assert named.keep == frozenset({31}) and named.required


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is a root caller's")
def test_a_root_caller_gets_the_setuid_rules_unless_it_says_otherwise() -> None:
    def program(**options: object) -> bytes:
        [load] = [s for s in plan_of(**options) if isinstance(s, steps.LoadSeccomp)]
        return load.program

    default = program()
    assert default == program(seccomp=ac.SeccompPolicy(deny_setuid_files=True))
    assert default != program(seccomp=ac.SeccompPolicy(deny_setuid_files=False))
    assert len(default) > len(program(seccomp=ac.SeccompPolicy(deny_setuid_files=False)))


def test_a_plan_is_plain_data() -> None:
    plan, request = plan_container(ac.ContainerSpec(mounts=SYSTEM), ["true"])
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert isinstance(plan.steps[-1], steps.Exec)
    assert all(isinstance(step, steps.Step) for step in plan.steps)
    assert request.id_map is not None and request.id_map.size == 1


def test_every_step_says_what_it_does() -> None:
    plan = plan_of(
        lambda: None,
        mounts=[*SYSTEM, ac.FileSystem("none", "/t", "tmpfs", flags={"shared"})],
        hostname="h",
        populate=print,
        pass_fds=(),
        limits={},
    )
    for step in plan:
        assert step.describe()
    assert {"SetPropagation", "LoadCallable", "Call", "RunCallable"} <= set(kinds(plan))
