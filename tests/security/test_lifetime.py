"""Nothing a container forks outlives it: a cgroup of its own for every container.

Without a pid namespace a container's processes may fork a daemon that
calls setsid, leaving the process group and the session: nothing but a
cgroup still holds it. Each test here made such a process outlive the
container (its stop(), its `async with`, its group, its fork server) before
every container got a cgroup of its own and was killed by it. The class of
incident: a runaway or hostile process left running on the host after its
container "ended" (runc's and Docker's "--init"/cgroup-kill fixes for
leftover processes of `docker exec`, moby#9098, are the same class).
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from procfs import alive

import asynccontainer as ac
from asynccontainer._core import client as _client
from asynccontainer._kernel.cgroups import TrackedCgroup, remove_tree
from asynccontainer._spec import limits as _cgroups

SYSTEM = ac.HOST_SYSTEM_MAPPINGS
# No pid namespace: what the container forks is not ended with its PID 1.
NO_PID_NAMESPACE = ["mnt", "ipc", "uts", "user"]
# A daemon that leaves the process group and the session, and its pid.
DAEMON = "setsid sleep 300 & echo $! > /out/daemon"


async def daemon_pid(out: Path) -> int:
    """Return the PID the container wrote to out/daemon, once the whole line is there."""
    path = out / "daemon"
    with anyio.fail_after(10):
        while not path.exists() or not path.read_text().endswith("\n"):
            await anyio.sleep(0.005)
    pid = int(path.read_text())
    assert alive(pid)
    return pid


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path


def mapping(out: Path) -> list[ac.FileSystemMapping]:
    return [*SYSTEM, ac.FileSystemMapping(str(out), "/out", writable=True)]


async def test_stop_kills_what_the_first_process_left(out: Path) -> None:
    """stop() returned with a setsid daemon of the container still running."""
    async with await ac.run_container(
        ["sh", "-c", f"{DAEMON}; exec sleep 300"], mounts=mapping(out), namespaces=NO_PID_NAMESPACE
    ) as container:
        daemon = await daemon_pid(out)
        await container.stop(grace=0)
        assert not alive(daemon)


async def test_leaving_async_with_after_the_exit_kills_what_was_left(out: Path) -> None:
    """The first process exited at once; its daemon ran on after the block."""
    async with await ac.run_container(
        ["sh", "-c", DAEMON], mounts=mapping(out), namespaces=NO_PID_NAMESPACE
    ) as container:
        assert await container.wait() == 0
        daemon = await daemon_pid(out)
        assert alive(daemon)  # wait() ends with the first process, not the rest
    assert not alive(daemon)


async def test_call_with_container_leaves_nothing(out: Path) -> None:
    """call_with_container returned 0 with a daemon of the command still running."""
    returncode = await ac.call_with_container(
        ["sh", "-c", DAEMON], mounts=mapping(out), namespaces=NO_PID_NAMESPACE
    )
    assert returncode == 0
    pid = int((out / "daemon").read_text())
    assert not alive(pid)


async def test_kill_ends_every_process_at_once(out: Path) -> None:
    """kill() while the first process runs: the daemon dies with it, not later."""
    async with await ac.run_container(
        ["sh", "-c", f"{DAEMON}; exec sleep 300"], mounts=mapping(out), namespaces=NO_PID_NAMESPACE
    ) as container:
        daemon = await daemon_pid(out)
        container.kill()
        assert await container.wait() == -signal.SIGKILL
        with anyio.fail_after(10):
            while alive(daemon):
                await anyio.sleep(0.005)


FORKER = """
import os, time
# Each generation forks the next, calls setsid and exits: a chain that
# never stays in one place, the way a fork-and-exit evasion tries to
# outrun a kill that walks a process list.
while True:
    if os.fork():
        os._exit(0)
    os.setsid()
    with open("/out/generations", "a") as file:
        file.write(f"{os.getpid()}\\n")
    time.sleep(0.001)
"""


async def test_a_process_that_keeps_forking_away_is_ended(out: Path) -> None:
    """A chain of fork, setsid and exit is ended by one cgroup.kill."""
    generations = out / "generations"

    def written() -> list[int]:
        text = generations.read_text() if generations.exists() else ""
        return [int(pid) for pid in text.splitlines()]

    async with await ac.run_container(
        ["python3", "-c", FORKER], mounts=mapping(out), namespaces=NO_PID_NAMESPACE
    ) as container:
        with anyio.fail_after(10):
            while len(written()) < 20:
                await anyio.sleep(0.005)
        await container.stop(grace=0)
    survivors = [pid for pid in written() if alive(pid)]
    assert not survivors


async def test_a_dropped_container_takes_what_it_left_along(out: Path) -> None:
    """A Container garbage-collected after its exit: its daemon is killed by the server."""
    container = await ac.run_container(
        ["sh", "-c", DAEMON], mounts=mapping(out), namespaces=NO_PID_NAMESPACE
    )
    assert await container.wait() == 0
    daemon = await daemon_pid(out)
    del container
    gc.collect()
    with anyio.fail_after(10):
        while alive(daemon):
            await anyio.sleep(0.005)


async def test_an_excursion_is_ended_with_its_container(out: Path) -> None:
    """What an excursion forks is in the container's cgroup, as docker exec's is."""
    async with await ac.run_container(
        ["sleep", "300"], mounts=mapping(out), namespaces=NO_PID_NAMESPACE
    ) as container:
        assert await ac.container_excursion(container, ["sh", "-c", DAEMON]) == 0
        daemon = await daemon_pid(out)
    assert not alive(daemon)


@pytest.mark.parametrize("respawn", [False, True])
async def test_leaving_a_group_ends_what_its_services_forked(out: Path, respawn: bool) -> None:
    """A service without a pid namespace: its daemon's own setsid child survived the group."""
    spec = ac.ServiceSpec(
        ["sh", "-c", f"{DAEMON}; exec sleep 300"],
        mappings=[ac.FileSystemMapping(str(out), "/out", writable=True)],
        namespaces=NO_PID_NAMESPACE,
        respawn=respawn,
        grace_period=0.5,
    )
    async with ac.ServiceGroup() as group:
        await group.start(spec)
        daemon = await daemon_pid(out)
    assert not alive(daemon)


async def test_a_killed_fork_server_leaves_nothing_running(out: Path) -> None:
    """The server killed from outside: its containers die with it, and their daemons too.

    Without a pid namespace the daemon is not the server's child's child
    any more, and PR_SET_PDEATHSIG does not reach it; the caller, seeing the
    server dead, kills what is left in its cgroups.
    """
    async with await ac.run_container(
        ["sh", "-c", f"{DAEMON}; exec sleep 300"], mounts=mapping(out), namespaces=NO_PID_NAMESPACE
    ) as container:
        daemon = await daemon_pid(out)
        server = _client._server
        assert server is not None
        os.kill(server.pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(server.process.wait)
        with pytest.raises(ac.ContainerError, match="fork server exited"):
            await container.wait()
    assert not alive(daemon)


# -- the kill itself, on cgroups made here, in both cgroup versions ------------


def members(cgroup: str) -> list[int]:
    found = []
    for path, _, _ in os.walk(cgroup):
        with open(os.path.join(path, "cgroup.procs")) as file:
            found.extend(int(pid) for pid in file.read().split())
    return found


# A shell moved into the cgroup, whose setsid children fork in turn.
TREE = "setsid sh -c 'sleep 300 & sleep 300' & setsid sleep 300 & wait"


async def kill_a_tree(cgroup: str, version: int, how: str = "kill", top: str = "") -> None:
    """Start a forking tree in `cgroup`, end `top` (or `cgroup`) `how`; check all of it is dead."""
    async with await anyio.open_process(
        ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec sh -c "{TREE}"'],
        # No pipes: an asyncio pipe transport left to the garbage collector
        # at the loop's end warns (an unclosed FileIO).
        stdin=None,
        stdout=None,
        stderr=None,
    ) as process:
        top = top or cgroup
        with anyio.fail_after(10):
            while len(members(top)) < 4:
                await anyio.sleep(0.005)
        pids = members(top)
        tracked = TrackedCgroup(top, version)
        assert tracked.populated()
        if how == "freeze":
            tracked._freeze_and_kill("cgroup.freeze", "1", "0")
        elif how == "end":
            assert not tracked.remove(wait=0)  # populated, if only below
            tracked.end()
        else:
            tracked.kill()
        with anyio.fail_after(10):
            while any(alive(pid) for pid in pids) or (how != "end" and tracked.populated()):
                await anyio.sleep(0.005)
        assert await process.wait() == -signal.SIGKILL


@pytest.fixture
async def cgroup_of(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A cgroup made for the test: in v2, or in the v1 freezer hierarchy (removed after)."""
    version = request.param
    hierarchy = next(
        h
        for h in _cgroups.hierarchies()
        if h.version == version and (version == 2 or "freezer" in h.controllers)
    )
    path = os.path.join(hierarchy.own, f"actest-{os.getpid()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        with anyio.fail_after(10):
            while not remove_tree(path):
                await anyio.sleep(0.005)


@pytest.mark.parametrize("cgroup_of", [2], indirect=True)
async def test_cgroup_kill_ends_a_v2_tree(cgroup_of: str) -> None:
    await kill_a_tree(cgroup_of, 2)


@pytest.mark.parametrize("cgroup_of", [2], indirect=True)
async def test_freezing_ends_a_v2_tree_without_cgroup_kill(cgroup_of: str) -> None:
    """Linux 5.12 and 5.13 have cgroup.freeze but no cgroup.kill: freeze, kill, thaw."""
    await kill_a_tree(cgroup_of, 2, how="freeze")
    assert "frozen 0" in Path(cgroup_of, "cgroup.events").read_text()


@pytest.mark.parametrize("cgroup_of", [1], indirect=True)
async def test_freezing_ends_a_v1_freezer_tree(cgroup_of: str) -> None:
    """Only cgroup v1 mounted: the freezer hierarchy, frozen, killed member by member, thawed."""
    await kill_a_tree(cgroup_of, 1)
    assert Path(cgroup_of, "freezer.state").read_text().strip() == "THAWED"


@pytest.mark.parametrize("cgroup_of", [2], indirect=True)
async def test_cgroups_made_below_a_containers_own_go_with_it(cgroup_of: str) -> None:
    """A container that may write its cgroupfs can nest cgroups in its own: all are ended."""
    nested = os.path.join(cgroup_of, "made", "inside")
    os.makedirs(nested)
    await kill_a_tree(nested, 2, how="end", top=cgroup_of)
    assert not os.path.exists(cgroup_of)
