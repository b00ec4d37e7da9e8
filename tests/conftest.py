"""Shared fixtures: both anyio backends, and a check that no test leaves anything behind."""

from __future__ import annotations

import glob
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest
from procfs import NOT_CONTAINERS, children_of, containers_of, process_name

from asynccontainer._core import client as _client
from asynccontainer._spec import limits as _cgroups


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    # Every coroutine test runs under asyncio and trio (anyio's plugin),
    # unless it is marked for pytest-trio on purpose. The mark must be on
    # the function before anyio's own collection hook parametrizes it.
    if (
        collector.funcnamefilter(name)  # type: ignore[attr-defined]
        and inspect.iscoroutinefunction(obj)
    ):
        marks = {mark.name for mark in getattr(obj, "pytestmark", [])}
        if not marks & {"trio", "anyio"}:
            pytest.mark.anyio(obj)


def pytest_configure(config: pytest.Config) -> None:
    # A temp directory of the session's own, so that the leak check below
    # sees what this suite leaves, not what other programs put in /tmp.
    directory = tempfile.mkdtemp(prefix="asynccontainer-tests-")
    config.stash[_TEMP_KEY] = directory
    os.environ["TMPDIR"] = directory
    tempfile.tempdir = directory


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = config.stash.get(_TEMP_KEY, None)
    if directory is not None:
        tempfile.tempdir = None
        shutil.rmtree(directory, ignore_errors=True)


_TEMP_KEY = pytest.StashKey[str]()


@pytest.fixture(params=["asyncio", "trio"], scope="session")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def describe_process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            command = file.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = "?"
    return f"{pid} [{process_state(pid)}] {command[:120]}"


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # the fd listdir itself used
    return fds


def mount_table() -> list[str]:
    with open("/proc/self/mountinfo") as file:
        # Mount IDs are reused; compare what is mounted where.
        return sorted(" ".join(line.split()[3:]) for line in file)


def temp_entries() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if not name.startswith("pytest-of-")}


def container_cgroups() -> set[str]:
    """Return the containers' cgroup directories in every hierarchy, but idle zygotes'.

    Every container has one (its tracking cgroup), and so has each zygote
    the server clones ahead of need: one holding only a zygote is no leak.
    """
    found = set()
    for hierarchy in _cgroups.hierarchies():
        for base in glob.glob(os.path.join(hierarchy.own, "asynccontainer-*")):
            for path in glob.glob(os.path.join(base, "*")):
                if os.path.isdir(path) and not holds_only_zygotes(path):
                    found.add(path)
    return found


def holds_only_zygotes(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.procs")) as file:
            members = [int(pid) for pid in file.read().split()]
    except OSError:
        return False
    return bool(members) and all(process_name(pid) in NOT_CONTAINERS for pid in members)


def fork_server_details() -> tuple[int | None, int | None]:
    server = _client._server
    if server is None or not server.alive():
        return None, None
    return server.pid, server.control.fileno()


def settled_containers_of(server_pid: int, earlier: set[int]) -> set[int]:
    """The server's containers not in `earlier`, once those ending have ended (5 s at most).

    The server is a subreaper: a daemon killed just now, adopted when its
    container ended, is a zombie until the server's SIGCHLD has it reaped,
    and one SIGKILLed a moment ago may still be exiting (not yet a zombie)
    on a loaded machine. A container really left behind stays: it is
    reported after the 5 s.
    """
    deadline = time.monotonic() + 5
    while True:
        containers = containers_of(server_pid) - earlier
        if time.monotonic() > deadline or not containers:
            return containers
        time.sleep(0.01)


def settled_cgroups(before: set[str]) -> set[str]:
    """The containers' cgroups not in `before`, once those just reaped are removed (5 s at most).

    The server tells a container's exit first and removes its cgroup right
    after (an rmdir is 0.1 ms the caller need not wait for): a test's end
    may come in between.
    """
    deadline = time.monotonic() + 5
    while True:
        cgroups = container_cgroups() - before
        if not cgroups or time.monotonic() > deadline:
            return cgroups
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def nothing_leaks() -> Iterator[None]:
    """Fail the test if it leaves a process, a zombie, an fd, a mount or a temp file behind."""
    fds_before = open_fds()
    children_before = children_of(os.getpid())
    mounts_before = mount_table()
    temp_before = temp_entries()
    cgroups_before = container_cgroups()
    server_before, _ = fork_server_details()
    containers_before = containers_of(server_before) if server_before else set()
    yield
    server_pid, control_fd = fork_server_details()
    problems = []

    # Report what this test left, not what an earlier one did.
    earlier = containers_before if server_pid == server_before else set()
    containers = settled_containers_of(server_pid, earlier) if server_pid else set()
    if containers:
        problems.append(
            "containers still running or unreaped under the fork server: "
            + "; ".join(describe_process(pid) for pid in sorted(containers))
        )
    stray = children_of(os.getpid()) - children_before - {server_pid}
    if stray:
        problems.append(
            "child processes left: " + "; ".join(describe_process(pid) for pid in sorted(stray))
        )

    fds_after = open_fds()
    new_fds = {
        fd: target
        for fd, target in fds_after.items()
        if fds_before.get(fd) != target and fd != control_fd
    }
    if new_fds:
        problems.append(f"file descriptors left open: {new_fds}")
    if mount_table() != mounts_before:
        problems.append("the host's mount table changed")
    new_cgroups = settled_cgroups(cgroups_before)
    if new_cgroups:
        problems.append(f"cgroups left: {sorted(new_cgroups)}")
    new_temp = temp_entries() - temp_before
    if new_temp:
        problems.append(f"temporary files left in {tempfile.gettempdir()}: {sorted(new_temp)}")
    if problems:
        pytest.fail("the test leaked:\n- " + "\n- ".join(problems), pytrace=False)
