"""The fork server: one exec'd, single-threaded helper per process that clones every container.

These tests look at the real server process through /proc: how it was
started, what it holds, whom it serves, and what happens to it and its
containers when the caller, the control socket or the server itself goes away.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import pytest
from procfs import children_of, containers_of, process_name, start_a_sweeping_server

import asynccontainer as ac
from asynccontainer._core import client as _client
from asynccontainer._spec import limits as _cgroups

SYSTEM = ac.HOST_SYSTEM_MAPPINGS

# Explicit, not left to conftest.py: anyio must see the mark when it collects
# a parametrized coroutine test, or the test loses its own parameters.
pytestmark = pytest.mark.anyio

# Orphans go to the system's PID 1, which may reap them only every second or
# two (here it does): an orphan that has exited but not been reaped yet is a
# zombie, dead all the same. Waiting for a process to die is bounded by this.
DEATH_TIMEOUT = 10.0


# -- /proc helpers -------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def parent_of(pid: int) -> int:
    fields = stat_fields(pid)
    assert fields is not None, f"process {pid} does not exist"
    return int(fields[1])


def start_time(pid: int) -> str:
    fields = stat_fields(pid)
    assert fields is not None, f"process {pid} does not exist"
    return fields[19]  # field 22, starttime: tells a recycled PID apart


def is_dead(pid: int, started: str) -> bool:
    """True if the process is gone, a zombie, or its PID now names another process."""
    fields = stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X") or fields[19] != started


def exists(pid: int) -> bool:
    return stat_fields(pid) is not None


def status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    raise AssertionError(f"/proc/{pid}/status has no {name} line")


def wait_until_dead(pids: dict[int, str], timeout: float = DEATH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid, started in pids.items() if not is_dead(pid, started)]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still alive after {timeout} s: {alive}")
        time.sleep(0.02)


async def wait_until_dead_async(pids: dict[int, str], timeout: float = DEATH_TIMEOUT) -> None:
    with anyio.fail_after(timeout):
        while not all(is_dead(pid, started) for pid, started in pids.items()):
            await anyio.sleep(0.02)


def current_server_pid() -> int:
    server = _client._server
    assert server is not None, "no fork server runs"
    assert server.alive()
    return server.pid


async def sleeping_container(**keywords: object) -> ac.Container:
    return await ac.run_container(["sleep", "60"], mounts=SYSTEM, **keywords)


# -- 1. how the server was started ---------------------------------------------


async def test_server_is_execd_single_threaded_and_named() -> None:
    async with await sleeping_container() as container:
        server = current_server_pid()
        assert parent_of(container.pid) == server

        with open(f"/proc/{server}/cmdline", "rb") as file:
            argv = file.read().split(b"\0")
        # A fresh interpreter, not a fork of this process (which would keep
        # pytest's argv): sys.executable -I -c BOOTSTRAP ...
        assert argv[0] == os.fsencode(sys.executable)
        assert b"-I" in argv
        assert b"-c" in argv
        assert argv.index(b"-I") < argv.index(b"-c")
        assert os.path.realpath(f"/proc/{server}/exe") == os.path.realpath(sys.executable)

        assert parent_of(server) == os.getpid()
        assert status_field(server, "Threads") == "1"
        with open(f"/proc/{server}/comm") as file:
            assert file.read() == "ac-forkserver\n"


# -- 2. one server, started on first use ---------------------------------------


async def test_one_server_for_all_containers_started_on_first_use() -> None:
    ac.shutdown_fork_server()
    assert _client._server is None

    parents = []
    for _ in range(2):
        async with await sleeping_container() as container:
            parents.append(parent_of(container.pid))
    server = current_server_pid()
    assert parents == [server, server]

    async def one() -> None:
        async with await sleeping_container() as container:
            parents.append(parent_of(container.pid))
            await anyio.sleep(0.1)  # all five run at the same time

    async with anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(one)
    assert parents == [server] * 7
    assert current_server_pid() == server


# -- 3. no socket file to connect to -------------------------------------------


async def test_server_holds_only_unnamed_sockets() -> None:
    containers = [await sleeping_container() for _ in range(3)]
    try:
        server = current_server_pid()
        inodes = set()
        for name in os.listdir(f"/proc/{server}/fd"):
            try:
                target = os.readlink(f"/proc/{server}/fd/{name}")
            except FileNotFoundError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        # The control socket and a status socket per running container.
        assert len(inodes) >= 4, inodes

        table = {}
        with open(f"/proc/{server}/net/unix") as file:
            next(file)  # Num RefCount Protocol Flags Type St Inode Path
            for line in file:
                fields = line.split()
                table[fields[6]] = fields
        for inode in inodes:
            assert inode in table, f"socket {inode} of the server is not an AF_UNIX socket"
            fields = table[inode]
            # No path (neither a file nor an abstract "@name"): nobody can
            # connect to it, it can only come from socketpair().
            assert len(fields) == 7, f"the server's socket {inode} is bound to {fields[7:]}"
            # __SO_ACCEPTCON: the socket listens.
            assert not int(fields[3], 16) & 0x10000, f"the server's socket {inode} listens"
    finally:
        for container in containers:
            await container.stop(grace=0)


# -- 4. dies with its parent ---------------------------------------------------

_ORPHANING_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import anyio
    import asynccontainer as ac
    from asynccontainer._core import client as _client

    OUT = sys.argv[1]

    async def main():
        container = await ac.run_container(["sleep", "60"], mounts=ac.HOST_SYSTEM_MAPPINGS)
        # Without a pid namespace: a daemon that outlives its container's
        # first process, in the container's cgroup.
        await ac.run_container(
            ["sh", "-c", "setsid sleep 60 & echo $! > /out/daemon; exec sleep 60"],
            mounts=[*ac.HOST_SYSTEM_MAPPINGS, ac.FileSystemMapping(OUT, "/out", writable=True)],
            namespaces=["mnt", "user"],
        )
        path = os.path.join(OUT, "daemon")
        while not os.path.exists(path) or not open(path).read().endswith("\\n"):
            await anyio.sleep(0.01)
        with open(path) as file:
            daemon = int(file.read())
        print(_client._server.pid, container.pid, daemon, flush=True)
        await anyio.sleep(60)

    anyio.run(main)
    """
)


def test_server_and_its_containers_die_with_the_caller(tmp_path: Path) -> None:
    """A caller killed takes its server and containers along; the next server ends the rest.

    What a container without a pid namespace forked does not die with the
    server: it is in the container's cgroup, which the next server started
    in the same cgroup kills and removes (sweep_stale).
    """
    errors = tmp_path / "stderr"
    out = tmp_path / "out"
    out.mkdir()
    with errors.open("wb") as stderr:
        caller = subprocess.Popen(
            [sys.executable, "-c", _ORPHANING_SCRIPT, str(out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert caller.stdout is not None
        ready = wait_readable(caller.stdout.fileno(), timeout=20)
        assert ready, f"the caller printed nothing:\n{errors.read_text()}"
        line = caller.stdout.readline().decode()
        assert line, f"the caller exited early:\n{errors.read_text()}"
        server, container, daemon = map(int, line.split())
        assert parent_of(server) == caller.pid
        assert parent_of(container) == server
        started = {server: start_time(server), container: start_time(container)}
        daemon_started = {daemon: start_time(daemon)}
    finally:
        caller.kill()
        caller.wait(timeout=10)
        if caller.stdout is not None:
            caller.stdout.close()
    assert caller.returncode == -signal.SIGKILL
    wait_until_dead(started)
    # The server usually dies of PR_SET_PDEATHSIG first; but the caller's
    # exit closes the control socket before it signals (exit_files runs
    # before exit_notify), so the server may begin its own shutdown, and
    # end the daemon, before the signal lands. Either way it cannot remove
    # its cgroups: that, and the daemon if it lives, is the next server's.
    left = [
        os.path.join(hierarchy.own, f"asynccontainer-{server}")
        for hierarchy in _cgroups.hierarchies()
    ]
    assert any(os.path.isdir(path) for path in left)
    start_a_sweeping_server()
    wait_until_dead(daemon_started)
    assert not any(os.path.exists(path) for path in left)


def wait_readable(fd: int, timeout: float) -> bool:
    """Wait until `fd` is readable (no event loop in this test); False on timeout."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(timeout))


# -- 5. control-socket EOF -----------------------------------------------------


async def test_shutdown_kills_running_containers() -> None:
    waited = await sleeping_container()
    unwaited = await sleeping_container()
    old = _client._server
    assert old is not None
    started = {c.pid: start_time(c.pid) for c in (waited, unwaited)}
    results: list[int] = []

    async def wait_for(container: ac.Container) -> None:
        results.append(await container.wait())

    async with waited, unwaited:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(wait_for, waited)
                await anyio.sleep(0.1)  # the waiter is blocked in wait()
                assert results == []
                ac.shutdown_fork_server()
            assert _client._server is None
            # The server kills them on EOF and still reports their exit.
            assert results == [-signal.SIGKILL]
            assert await unwaited.wait() == -signal.SIGKILL
    assert waited.returncode == unwaited.returncode == -signal.SIGKILL
    # The server reaped them before it exited, and was reaped in turn.
    assert not any(exists(pid) for pid in started)
    assert old.process.returncode == 0
    assert not exists(old.pid)


async def test_the_server_adopts_what_a_container_without_pid_namespace_leaves(
    tmp_path: Path,
) -> None:
    """A daemon whose container ended is the server's (a subreaper): reaped, killed at shutdown."""
    daemons = "sleep 0.1 & echo $! > /out/short; sleep 60 & echo $! > /out/long"
    async with await ac.run_container(
        ["sh", "-c", daemons],
        mounts=[*SYSTEM, ac.FileSystemMapping(str(tmp_path), "/out", writable=True)],
        namespaces=["mnt", "ipc", "uts", "net", "user"],
    ) as container:
        assert await container.wait() == 0
        server = current_server_pid()
        short, long = (int((tmp_path / name).read_text()) for name in ("short", "long"))
        started = start_time(long)
        assert parent_of(long) == server
        # The one that exited by itself is reaped by the server: not a zombie.
        with anyio.fail_after(DEATH_TIMEOUT):
            while exists(short):
                await anyio.sleep(0.02)
        ac.shutdown_fork_server()
        # Killed and reaped before the server exited.
        fields = stat_fields(long)
        assert fields is None or fields[19] != started, f"{long} survived the server"


# -- 6. the server killed from outside -----------------------------------------


async def test_server_killed_from_outside_is_replaced() -> None:
    container = await sleeping_container()
    old = _client._server
    assert old is not None
    old_pid = old.pid
    started = {container.pid: start_time(container.pid)}
    async with container:
        os.kill(old_pid, signal.SIGKILL)
        with anyio.fail_after(10), pytest.raises(ac.ContainerError, match="fork server exited"):
            await container.wait()
        assert container.returncode == -signal.SIGKILL
    # It died with the server (PR_SET_PDEATHSIG); the system's init reaps it.
    await wait_until_dead_async(started)

    assert await ac.call_with_container(["true"], mounts=SYSTEM) == 0
    new = _client._server
    assert new is not None and new is not old
    assert new.pid != old_pid
    assert new.alive()
    # The dead server was reaped when it was found dead: no zombie is left.
    assert old.process.returncode == -signal.SIGKILL
    assert not exists(old_pid)


# -- 7. the server reaps every child -------------------------------------------


async def test_server_reaps_every_child() -> None:
    server = None
    for number in range(10):
        assert await ac.call_with_container(["sh", "-c", f"exit {number}"], mounts=SYSTEM) == number
        server = server or current_server_pid()

    returncodes: list[int] = []

    async def short(number: int) -> None:
        returncodes.append(await ac.call_with_container(lambda: None))

    async def killed() -> None:
        container = await sleeping_container()
        container.kill()
        returncodes.append(await container.wait())

    async with anyio.create_task_group() as group:
        for number in range(5):
            group.start_soon(short, number)
            group.start_soon(killed)
    assert sorted(returncodes) == [-signal.SIGKILL] * 5 + [0] * 5

    assert current_server_pid() == server
    assert containers_of(server) == set()
    # Nor is anything of ours a zombie.
    for child in children_of(os.getpid()):
        fields = stat_fields(child)
        assert fields is None or fields[0] != "Z", f"zombie child {child}"


# -- 8. both backends, several event loops -------------------------------------


async def server_pid_of_a_container() -> int:
    async with await sleeping_container() as container:
        parent = parent_of(container.pid)
    assert await ac.call_with_container(["sh", "-c", "exit 3"], mounts=SYSTEM) == 3
    return parent


def test_asyncio_and_trio_one_after_the_other_share_the_server() -> None:
    on_asyncio = anyio.run(server_pid_of_a_container, backend="asyncio")
    on_trio = anyio.run(server_pid_of_a_container, backend="trio")
    assert on_asyncio == on_trio == current_server_pid()


def test_asyncio_and_trio_in_two_threads_at_once_share_the_server() -> None:
    server = _client.fork_server().pid
    results: dict[str, list[tuple[int, int]]] = {}
    errors: list[BaseException] = []

    async def ten_containers() -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []

        async def one(number: int) -> None:
            async with await sleeping_container() as container:
                parent = parent_of(container.pid)
                await anyio.sleep(0.05)
                container.kill()
                assert await container.wait() == -signal.SIGKILL
            code = await ac.call_with_container(["sh", "-c", f"exit {number}"], mounts=SYSTEM)
            found.append((parent, code))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for number in range(10):
                    group.start_soon(one, number)
        return found

    def run(backend: str) -> None:
        try:
            results[backend] = anyio.run(ten_containers, backend=backend)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(backend,)) for backend in ("asyncio", "trio")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    for backend in ("asyncio", "trio"):
        assert sorted(results[backend]) == [(server, number) for number in range(10)], backend
    assert current_server_pid() == server


def test_server_started_from_a_thread_outlives_the_thread() -> None:
    # PR_SET_PDEATHSIG fires when the creating *thread* exits; a server
    # started from a short-lived thread must keep serving.
    ac.shutdown_fork_server()
    found: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            found.append(anyio.run(server_pid_of_a_container, backend="trio"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []
    time.sleep(0.2)  # time for a death signal to arrive, if one were sent
    assert current_server_pid() == found[0]
    assert anyio.run(server_pid_of_a_container, backend="asyncio") == found[0]


# -- 9. the container's process ------------------------------------------------


async def read_line(fd: int) -> str:
    with os.fdopen(fd, "rb") as reader:
        return (await anyio.to_thread.run_sync(reader.readline)).decode()


@pytest.mark.parametrize("pid_namespace", [True, False])
async def test_container_is_a_child_of_the_server(pid_namespace: bool) -> None:
    namespaces = set(ac.NAMESPACES) if pid_namespace else set(ac.NAMESPACES) - {"pid"}
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    try:
        container = await ac.run_container(
            ["sh", "-c", "echo $$; read line"],
            mounts=SYSTEM,
            namespaces=namespaces,
            stdin=stdin_r,
            stdout=stdout_w,
        )
    except BaseException:
        os.close(stdin_w)
        os.close(stdout_r)
        raise
    finally:
        os.close(stdin_r)
        os.close(stdout_w)
    try:
        async with container:
            with anyio.fail_after(10):
                inside = int(await read_line(stdout_r))
            assert parent_of(container.pid) == current_server_pid()
            nspid = status_field(container.pid, "NSpid").split()
            assert nspid[0] == str(container.pid)
            if pid_namespace:
                assert nspid == [str(container.pid), "1"]
                assert inside == 1
            else:
                assert nspid == [str(container.pid)]
                assert inside == container.pid
            os.write(stdin_w, b"done\n")
            with anyio.fail_after(10):
                assert await container.wait() == 0
    finally:
        os.close(stdin_w)


# -- 10. a multi-threaded caller -----------------------------------------------


async def test_multi_threaded_caller() -> None:
    release = threading.Event()
    idle = [threading.Thread(target=release.wait, args=(30,)) for _ in range(8)]
    for thread in idle:
        thread.start()
    try:
        assert int(status_field(os.getpid(), "Threads")) >= 9
        # The server is started from this multi-threaded process, and the
        # containers get user namespaces (unshare(CLONE_NEWUSER) would fail
        # with EINVAL in a process with threads).
        ac.shutdown_fork_server()
        returncodes: list[int] = []

        async def one(number: int) -> None:
            returncodes.append(
                await ac.call_with_container(["sh", "-c", f"exit {number}"], mounts=SYSTEM)
            )

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for number in range(8):
                    group.start_soon(one, number)
        assert sorted(returncodes) == list(range(8))
        assert status_field(current_server_pid(), "Threads") == "1"
    finally:
        release.set()
        for thread in idle:
            thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in idle)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs on the host")
async def test_a_zygote_sees_a_file_system_mounted_after_it_was_cloned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zygotes are cloned ahead of need; their mount namespace must not be a stale copy.

    On a host whose mounts are private, a zygote that had its mount
    namespace from the clone missed every file system mounted since: the
    new namespace is entered after the go, from the host's current table.
    (Zygotes are the Python executor's; the C executor clones per start.)
    """
    monkeypatch.setenv("ASYNCCONTAINER_EXECUTOR", "python")
    assert await ac.call_with_container(["true"], mounts=SYSTEM) == 0
    # Idle now: the server clones a zygote for these flags; wait until it exists.
    server = _client._server
    assert server is not None
    with anyio.fail_after(10):
        while "ac-zygote" not in {process_name(pid) for pid in children_of(server.pid)}:
            await anyio.sleep(0.005)
    directory = tmp_path / "late"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(directory)], check=True)
    try:
        (directory / "marker").write_text("mounted late\n")
        mapping = ac.FileSystemMapping(str(directory), "/late")
        returncode = await ac.call_with_container(
            ["cat", "/late/marker"], mounts=[*SYSTEM, mapping], stdout=subprocess.DEVNULL
        )
        assert returncode == 0
    finally:
        subprocess.run(["umount", str(directory)], check=True)
