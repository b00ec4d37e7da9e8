"""Guix's call-with-container relays SIGINT and SIGTERM to the container.

Here a SIGINT to the caller becomes KeyboardInterrupt, which cancels
call_with_container, which kills and reaps the container before the
interrupt propagates. A SIGTERM ends the caller, and its fork server and
containers die with it (PR_SET_PDEATHSIG). Both are tested on a real
caller process, under each backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from procfs import start_a_sweeping_server

SCRIPT = """
import os, sys, anyio, asynccontainer as ac

def containers(server):
    # The server's children but idle zygotes (cloned ahead of need).
    with open(f"/proc/{server}/task/{server}/children") as file:
        children = file.read().split()
    def name(pid):
        try:
            return open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            return None
    return [pid for pid in children if name(pid) not in ("ac-zygote", "ac-forkserver")]

async def main():
    async def report():
        # Wait until the container runs, then print its PID.
        for _ in range(500):
            server = ac._core.client._server
            if server is not None:
                children = containers(server.pid)
                if children:
                    print(server.pid, children[0], flush=True)
                    return
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        group.start_soon(report)
        await ac.call_with_container(["sleep", "60"], mounts=ac.HOST_SYSTEM_MAPPINGS)

try:
    anyio.run(main, backend=sys.argv[1])
except* KeyboardInterrupt:  # trio's task group wraps it in a group
    server = ac._core.client._server
    children = containers(server.pid)
    print("interrupted; containers left:", len(children), flush=True)
    sys.exit(130)
"""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_until_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.02)
    return False


def start_caller(backend: str) -> tuple[subprocess.Popen[str], int, int]:
    caller = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, backend],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert caller.stdout is not None
    server_pid, container_pid = map(int, caller.stdout.readline().split())
    return caller, server_pid, container_pid


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigint_kills_and_reaps_the_container_before_propagating(backend: str) -> None:
    caller, _, container_pid = start_caller(backend)
    try:
        caller.send_signal(signal.SIGINT)
        out, _ = caller.communicate(timeout=30)
    finally:
        caller.kill()
        caller.wait()
    assert caller.returncode == 130
    assert out.strip() == "interrupted; containers left: 0"
    assert gone(container_pid)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigterm_to_the_caller_takes_its_containers_down(backend: str) -> None:
    caller, server_pid, container_pid = start_caller(backend)
    try:
        caller.send_signal(signal.SIGTERM)
        caller.wait(timeout=30)
    finally:
        caller.kill()
        caller.wait()
        assert caller.stdout is not None
        caller.stdout.close()
    assert caller.returncode == -signal.SIGTERM
    # Orphans are reaped by this machine's init, which may take a moment.
    assert wait_until_gone(server_pid), "the fork server outlived its caller"
    assert wait_until_gone(container_pid), "the container outlived its caller"
    assert os.getpid() != server_pid
    start_a_sweeping_server()
