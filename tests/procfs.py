"""Processes as /proc shows them: children, names, and the fork server's containers."""

from __future__ import annotations

import os

from asynccontainer._core import client as _client

# The fork server clones a child ahead of need when idle (_server.py,
# "zygotes"): an idle one is not a container, and not a leak. For a moment
# after the clone it still bears the server's name; a container renames
# itself "ac-container" as soon as it is handed its request.
NOT_CONTAINERS = ("ac-zygote", "ac-forkserver")


def children_of(pid: int) -> set[int]:
    """Return the PIDs of the direct children of `pid` (every thread's)."""
    found: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as file:
                found.update(int(child) for child in file.read().split())
        except FileNotFoundError:
            pass
    return found


def process_name(pid: int) -> str | None:
    """Return /proc/PID/comm, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _state(pid: int) -> str | None:
    """Return the state letter of `pid` (R, S, Z ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def is_zombie(pid: int) -> bool:
    """True if `pid` has exited and waits to be reaped."""
    return _state(pid) == "Z"


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie has exited: it does not)."""
    return _state(pid) not in (None, "Z")


def containers_of(server_pid: int) -> set[int]:
    """Return the fork server's children but its idle zygotes."""
    return {pid for pid in children_of(server_pid) if process_name(pid) not in NOT_CONTAINERS}


def fork_server_containers() -> set[int]:
    """Return the containers of this process's fork server (none if it does not run)."""
    server = _client._server
    if server is None or not server.alive():
        return set()
    return containers_of(server.pid)


def start_a_sweeping_server() -> None:
    """Replace this process's fork server by a new one, which sweeps dead servers' cgroups.

    A server killed with its caller cannot end what still runs in its
    cgroups or remove them; the next server started in the same cgroup does
    (`sweep_stale`), which is what a test of a killed caller shows after.
    """
    import anyio

    import asynccontainer as ac

    _client.shutdown_fork_server()
    assert anyio.run(ac.call_with_container, lambda: None) == 0
