"""A service's life as systemd and Shepherd 1.0 follow it: sd_notify, the main process,
events, log rotation.

Small Python and shell scripts as the daemons, under both backends; the
real daemons are in test_daemons.py.
"""

from __future__ import annotations

import array
import glob
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterable
from pathlib import Path

import anyio
import pytest
from procfs import alive

import asynccontainer as ac

GRACE = 0.5

# What a daemon built with sd_notify(3) does, in a few lines: send a datagram
# to $NOTIFY_SOCKET.
NOTIFY = """
import os, signal, socket, subprocess, sys, time
def notify(text):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), os.environ["NOTIFY_SOCKET"])
"""


def python(script: str) -> list[str]:
    # Debian's, which the service's default mounts hold (.ci/run installs it).
    return ["/usr/bin/python3", "-u", "-c", NOTIFY + script]


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


async def until_logged(service: ac.Service, text: str, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not any(text in line for line in service.recent_log):
            await anyio.sleep(0.01)


def notify_sockets() -> list[str]:
    """The notify sockets of this process's services (in $TMPDIR, else /tmp)."""
    return [
        path
        for base in {tempfile.gettempdir(), "/tmp"}
        for path in glob.glob(os.path.join(base, "ac-notify-*", "notify"))
    ]


# -- sd_notify -------------------------------------------------------------------------


async def test_ready_status_and_mainpid() -> None:
    """start returns on READY=1 (not before: STATUS= came in the same datagram), and
    MAINPID= names the main process: a child, whose death ends the service while
    the command still runs; the returncode is the child's."""
    script = """
child = subprocess.Popen(["sleep", "60"])
notify("STATUS=warming up")
time.sleep(0.2)
notify(f"MAINPID={child.pid}\\nSTATUS=serving\\nREADY=1")
print("notified", flush=True)
time.sleep(60)
"""
    spec = ac.ServiceSpec(python(script), notify=True, grace_period=GRACE)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert service.status_text == "serving"
        assert service.state == "running"
        assert service.pid is not None
        with open(f"/proc/{service.pid}/cmdline", "rb") as cmdline:
            assert cmdline.read().split(b"\0")[0] == b"sleep"
        os.kill(service.pid, signal.SIGKILL)
        with anyio.fail_after(10):
            assert await service.wait() == -signal.SIGKILL
        assert service.state == "failed"


async def test_no_ready_within_start_timeout() -> None:
    spec = ac.ServiceSpec(sh("exec sleep 60"), notify=True, start_timeout=0.5)
    async with ac.ServiceGroup() as group:
        with anyio.fail_after(10), pytest.raises(TimeoutError, match="sent no READY=1"):
            await group.start(spec)
    assert notify_sockets() == []


async def test_dying_before_ready_raises_at_once() -> None:
    spec = ac.ServiceSpec(sh("echo cannot bind; exit 2"), notify=True, start_timeout=60)
    async with ac.ServiceGroup() as group:
        with anyio.fail_after(20), pytest.raises(ac.ServiceStartError) as caught:
            await group.start(spec)
    assert caught.value.returncode == 2
    assert caught.value.log == ["cannot bind"]


async def test_reload_waits_for_ready_after_reloading_and_events_tell_each_state() -> None:
    script = """
def on_hup(signum, frame):
    notify("RELOADING=1")
    print("reloading", flush=True)
    notify("READY=1")
signal.signal(signal.SIGHUP, on_hup)
notify("READY=1")
while True:
    time.sleep(60)
"""
    spec = ac.ServiceSpec(python(script), notify=True, grace_period=GRACE)
    async with ac.ServiceGroup() as group:
        events = group.events()
        service = await group.start(spec)
        await service.reload()
        assert service.state == "running"
        # Its output comes on a pipe of its own, maybe after the datagrams.
        await until_logged(service, "reloading")
        await service.stop()
        assert service.state == "stopped"
    # Read after the group's end: nothing was lost, and the stream ends.
    with anyio.fail_after(5):
        seen = [(event.service, event.state) async for event in events]
    assert seen == [
        (service, "starting"),
        (service, "running"),
        (service, "reloading"),
        (service, "running"),
        (service, "stopping"),
        (service, "stopped"),
    ]


async def test_events_carry_the_returncode_and_end_with_the_group() -> None:
    received: list[ac.ServiceEvent] = []
    async with anyio.create_task_group() as tasks, ac.ServiceGroup() as group:

        async def follow(events: AsyncIterable[ac.ServiceEvent]) -> None:
            async for event in events:
                received.append(event)

        tasks.start_soon(follow, group.events())
        service = await group.start(ac.ServiceSpec(sh("exit 7")))
        with anyio.fail_after(10):
            await service.wait()
    # follow() ended by itself, with the group.
    assert [(e.state, e.returncode) for e in received] == [
        ("starting", None),
        ("running", None),
        ("failed", 7),
    ]
    assert all(e.time > 0 for e in received)


async def test_datagrams_of_other_processes_are_ignored() -> None:
    """The socket is reachable on the host (by root): a READY=1 from there, with an fd
    and a MAINPID= of a host process, changes nothing; nor does an oversized one.
    The service never says READY=1 itself, so the start must time out."""
    spec = ac.ServiceSpec(sh("exec sleep 60"), notify=True, start_timeout=1.5)
    forged = anyio.Event()
    async with ac.ServiceGroup() as group, anyio.create_task_group() as tasks:

        async def forge() -> None:
            with anyio.fail_after(10):
                while not notify_sockets():
                    await anyio.sleep(0.01)
            path = notify_sockets()[0]
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                fds = array.array("i", [sender.fileno()])
                sender.sendmsg(
                    [f"MAINPID={os.getpid()}\nSTATUS=forged\nREADY=1".encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())],
                    0,
                    path,
                )
                sender.sendto(b"READY=1\n" + b"x" * 70000, path)
            forged.set()

        tasks.start_soon(forge)
        with anyio.fail_after(20), pytest.raises(TimeoutError):
            await group.start(spec)
    assert forged.is_set()


async def test_a_mainpid_outside_the_service_is_ignored() -> None:
    script = """
notify(f"MAINPID=1\\nREADY=1")
notify(f"MAINPID=4000000\\nSTATUS=after")
time.sleep(60)
"""
    spec = ac.ServiceSpec(python(script), notify=True, grace_period=GRACE)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        with anyio.fail_after(10):
            while service.status_text != "after":
                await anyio.sleep(0.01)
        # MAINPID=1 is its own init: not a process to follow as the main one.
        assert service.pid is not None
        with open(f"/proc/{service.pid}/cmdline", "rb") as cmdline:
            assert b"python" in cmdline.read().split(b"\0")[0]


# -- the main process ----------------------------------------------------------------

# A forking daemon: its parent writes the PID file and exits; the daemon
# forks a worker, as nginx's master does.
FORKING = "(sleep 60 & echo $! > /run/worker; exec sleep 61) & echo $! > /run/d.pid; exit 0"


async def test_the_pid_files_process_dying_ends_the_service_and_its_worker() -> None:
    spec = ac.ServiceSpec(
        sh(FORKING), pid_file="/run/d.pid", respawn=True, respawn_delay=0, grace_period=GRACE
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        first = service.pid
        assert first is not None
        with anyio.fail_after(10):
            # The PID file may name the daemon before it has forked its worker.
            while len(workers := _children(first)) != 1:
                await anyio.sleep(0.01)
        restarted = anyio.Event()

        async def follow() -> None:
            async for event in group.events():
                if event.state == "restarting":
                    assert event.returncode == -signal.SIGKILL
                if event.state == "running":
                    restarted.set()
                    return

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(follow)
            await anyio.lowlevel.checkpoint()
            os.kill(first, signal.SIGKILL)
            with anyio.fail_after(10):
                await restarted.wait()
        assert service.restarts == 1 and service.pid not in (None, first)
        with anyio.fail_after(10):
            while any(alive(pid) for pid in workers):
                await anyio.sleep(0.01)


async def test_a_pid_file_naming_an_older_host_process_is_refused(tmp_path: Path) -> None:
    """Without a pid namespace a PID file can name any host process, which the stop would
    signal: one older than the service (here the caller itself) is not followed."""
    spec = ac.ServiceSpec(
        sh(f"echo {os.getpid()} > {tmp_path}/d.pid; exec sleep 60"),
        pid_file=str(tmp_path / "d.pid"),
        namespaces=["mnt"],
        mappings=[ac.FileSystemMapping(str(tmp_path), writable=True)],
        grace_period=GRACE,
    )
    async with ac.ServiceGroup() as group:
        with anyio.fail_after(20), pytest.raises(PermissionError, match="older than the service"):
            await group.start(spec)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


async def test_start_timeout_is_pid_file_timeout() -> None:
    spec = ac.ServiceSpec(["true"], pid_file_timeout=2.5)
    assert spec.start_timeout == spec.pid_file_timeout == 2.5
    assert ac.ServiceSpec(["true"], start_timeout=3).pid_file_timeout == 3
    assert ac.ServiceSpec(["true"]).start_timeout == 5.0


@pytest.mark.parametrize(
    ("keywords", "text"),
    [
        ({"start_timeout": 1, "pid_file_timeout": 2}, "two names for one number"),
        ({"notify": True, "pid_file": "/run/x.pid"}, "drop pid_file"),
        ({"notify": True, "namespaces": ["mnt"]}, "needs a pid namespace"),
        ({"log_max_bytes": 4096}, "give a log_file too"),
        ({"log_max_bytes": 10, "log_file": "/tmp/x.log"}, "from 1024"),
        ({"log_keep": 0, "log_file": "/tmp/x.log"}, "log_keep"),
        ({"notify": "yes"}, "notify"),
    ],
)
def test_bad_keywords(keywords: dict[str, object], text: str) -> None:
    with pytest.raises((TypeError, ValueError), match=text):
        ac.ServiceSpec(["true"], **keywords)  # type: ignore[arg-type]


# -- log rotation ------------------------------------------------------------------------


async def write_300_lines(log: Path, keep: int) -> None:
    """Run a service writing 300 lines to `log`, rotated at 1024 bytes."""
    spec = ac.ServiceSpec(
        sh('i=0; while [ $i -lt 300 ]; do echo "line $i of the service"; i=$((i+1)); done'),
        log_file=str(log),
        log_max_bytes=1024,
        log_keep=keep,
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        with anyio.fail_after(10):
            await service.wait()


async def test_log_rotation_loses_no_line(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    await write_300_lines(log, keep=50)
    files = sorted(tmp_path.glob("svc.log.*"), key=lambda p: -int(p.suffix[1:]))
    assert len(files) >= 10
    lines = [line for f in [*files, log] for line in f.read_text().splitlines()]
    assert [line.split(" ", 2)[2] for line in lines] == [
        f"line {i} of the service" for i in range(300)
    ]
    assert all(f.stat().st_size < 1024 + 64 for f in files)


async def test_log_rotation_keeps_log_keep_files_and_moves_links_as_links(tmp_path: Path) -> None:
    """A link planted where FILE.2 goes is renamed as a link: what it points to is untouched."""
    log = tmp_path / "svc.log"
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    (tmp_path / "svc.log.1").symlink_to(precious)
    await write_300_lines(log, keep=2)
    assert sorted(p.name for p in tmp_path.glob("svc.log*")) == [
        "svc.log",
        "svc.log.1",
        "svc.log.2",
    ]
    assert precious.read_text() == "keep me\n"
    assert not any(p.is_symlink() for p in tmp_path.glob("svc.log*"))
    assert log.read_text().splitlines()[-1].endswith("line 299 of the service")
