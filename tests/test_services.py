"""Services: ServiceSpec, ServiceGroup and Service, with real daemons in real containers.

Shepherd's make-forkexec-constructor/container, in the async world: PID files
written late and in pieces, daemons that fork, ignore SIGTERM or die at once,
log files, users and groups, and groups of many services stopped together.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import pwd
import re
import signal
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from procfs import children_of, fork_server_containers

import asynccontainer as ac
from asynccontainer._core import client as _client

GRACE = 0.5
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
NOBODY = pwd.getpwnam("nobody")

_log_names = itertools.count()


# -- helpers -------------------------------------------------------------------


def process_state(pid: int) -> str:
    """Return the state letter of a process, or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def is_gone(pid: int) -> bool:
    return process_state(pid) in ("gone", "Z", "X")


def is_alive(pid: int) -> bool:
    return not is_gone(pid)


def cmdline(pid: int) -> list[str]:
    """Return the arguments of a process; [] once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().decode().split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


def nspid(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("NSpid:"):
                return [int(field) for field in line.split()[1:]]
    raise AssertionError(f"no NSpid line for {pid}")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as file:
        return int(file.read().rsplit(")", 1)[1].split()[1])


def namespace_of(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def pids_in_pid_namespace(namespace: str) -> set[int]:
    """Return the host PIDs of the live processes whose pid namespace is `namespace`."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if namespace_of(name, "pid") == namespace and is_alive(int(name)):
                found.add(int(name))
        except OSError:
            continue
    return found


async def wait_gone(pids: Iterable[int], timeout: float = 5.0) -> None:
    """Assert that every process in `pids` is gone, polling up to `timeout`.

    A daemon whose parent exited is reparented to the VM's init, which
    reaps it slowly; until then it is a zombie, which counts as gone.
    """
    pids = set(pids)
    with anyio.move_on_after(timeout):
        while not all(is_gone(pid) for pid in pids):
            await anyio.sleep(0.02)
    alive = {pid: process_state(pid) for pid in pids if is_alive(pid)}
    assert not alive, f"processes still alive: {alive}"


async def wait_for_file(path: Path, timeout: float = 5.0) -> str:
    """Return the content of `path` once it holds a whole line."""
    with anyio.fail_after(timeout):
        while True:
            try:
                text = path.read_text()
            except FileNotFoundError:
                text = ""
            if text.endswith("\n"):
                return text
            await anyio.sleep(0.02)


def fork_server_children() -> set[int]:
    return fork_server_containers()


def log_lines(path: Path) -> list[str]:
    """Return the lines of a log file, every one checked to be valid UTF-8."""
    return path.read_bytes().decode("utf-8").splitlines()


def messages(lines: Sequence[str]) -> list[str]:
    """Check each line's timestamp prefix; return the lines without it."""
    now = datetime.datetime.now()
    result = []
    for line in lines:
        assert LOG_PREFIX.match(line), f"no timestamp prefix: {line!r}"
        stamp = datetime.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
        assert abs((now - stamp).total_seconds()) < 120, line
        result.append(line[20:])
    return result


async def run_service(
    tmp_path: Path, command: Sequence[str], **keywords: Any
) -> tuple[int, list[str]]:
    """Run a service that exits by itself; return its status and its logged lines."""
    log = tmp_path / f"service-{next(_log_names)}.log"
    keywords.setdefault("grace_period", GRACE)
    spec = ac.ServiceSpec(command, log_file=str(log), **keywords)
    with anyio.fail_after(15):
        async with ac.ServiceGroup() as group:
            service = await group.start(spec)
            status = await service.wait()
    # Leaving the group waits for the logger to write the last lines.
    return status, messages(log_lines(log))


def sh(script: str, *args: str) -> list[str]:
    return ["sh", "-c", script, "sh", *args]


# -- PID files ---------------------------------------------------------------

# The daemon forks, its parent exits at once; 0.3 s later the daemon writes
# its PID file in two pieces (all digits but the last, no newline; then,
# 0.3 s later, the last digit and the newline), keeping it open in between,
# and then becomes `sleep`. In a pid namespace, a few processes are spawned
# first so that the daemon's PID has two digits to split.
LATE_DAEMON = r"""
i=0
while [ $i -lt 12 ]; do /bin/true; i=$((i + 1)); done
sh -c '
  sleep 0.3
  pid=$$
  head=${pid%?}
  exec 3>/var/run/daemon.pid
  printf %s "$head" >&3
  sleep 0.3
  printf "%s\n" "${pid#$head}" >&3
  exec 3>&-
  exec sleep 300
' &
exit 0
"""


@pytest.mark.parametrize("namespaces", [None, ["mnt"]], ids=["default", "mnt-only"])
async def test_daemon_writing_its_pid_file_late_and_in_pieces(
    namespaces: list[str] | None,
) -> None:
    keywords: dict[str, Any] = {} if namespaces is None else {"namespaces": namespaces}
    spec = ac.ServiceSpec(
        sh(LATE_DAEMON),
        pid_file="/var/run/daemon.pid",
        pid_file_timeout=5,
        grace_period=GRACE,
        **keywords,
    )
    async with ac.ServiceGroup() as group:
        started = anyio.current_time()
        service = await group.start(spec)
        elapsed = anyio.current_time() - started
        # The first piece ("1" of "15\n") was not taken for a PID.
        assert elapsed >= 0.55
        pid = service.pid
        assert pid is not None
        assert service.running
        assert is_alive(pid)
        # The daemon execs sleep right after writing its PID file.
        with anyio.fail_after(2):
            while cmdline(pid) != ["sleep", "300"]:
                await anyio.sleep(0.01)
        with open(f"/proc/{pid}/root/var/run/daemon.pid") as file:
            written = int(file.read())
        if namespaces is None:
            # The host PID of the daemon, not its PID in the container, and
            # not the container's first process (the init, PID 1, whose
            # child the daemon became when its parent exited).
            assert nspid(pid) == [pid, written]
            assert written >= 10
            assert nspid(parent_of(pid))[-1] == 1
            assert namespace_of(pid, "pid") != namespace_of("self", "pid")
        else:
            assert nspid(pid) == [pid] == [written]
            assert namespace_of(pid, "pid") == namespace_of("self", "pid")
        assert namespace_of(pid, "mnt") != namespace_of("self", "mnt")
        stopped = anyio.current_time()
        await service.stop()
        # sleep dies of SIGTERM at once: no need for the grace period.
        assert anyio.current_time() - stopped < GRACE + 2
        assert not service.running
        await wait_gone([pid])


async def test_pid_file_never_written_without_pid_namespace(tmp_path: Path) -> None:
    # The daemon records its (host) PID where the test can read it, and
    # never writes its PID file; its parent exits at once.
    daemon = sh("sh -c 'echo $$ > /out/daemon; exec sleep 300' & exit 0")
    spec = ac.ServiceSpec(
        daemon,
        namespaces=["mnt"],
        mappings=[ac.FileSystemMapping(str(tmp_path), "/out", writable=True)],
        pid_file="/var/run/never.pid",
        pid_file_timeout=1,
        grace_period=GRACE,
    )
    async with ac.ServiceGroup() as group:
        started = anyio.current_time()
        with pytest.raises(TimeoutError):
            await group.start(spec)
        elapsed = anyio.current_time() - started
        assert 1 <= elapsed < 1 + 1.5
        daemon_pid = int(await wait_for_file(tmp_path / "daemon"))
        await wait_gone([daemon_pid])
        assert group.services == ()


async def test_pid_file_never_written_in_pid_namespace(tmp_path: Path) -> None:
    # The daemon records its pid namespace; the test looks up the host PIDs
    # of the processes in it while the start waits, and checks that they
    # are all gone after the TimeoutError.
    daemon = sh("sh -c 'readlink /proc/self/ns/pid > /out/ns; exec sleep 300' & exit 0")
    spec = ac.ServiceSpec(
        daemon,
        mappings=[ac.FileSystemMapping(str(tmp_path), "/out", writable=True)],
        pid_file="/var/run/never.pid",
        pid_file_timeout=1,
        grace_period=GRACE,
    )
    seen: set[int] = set()

    async def look() -> None:
        namespace = (await wait_for_file(tmp_path / "ns", timeout=1)).strip()
        with anyio.fail_after(1):
            while not any(cmdline(pid) == ["sleep", "300"] for pid in seen):
                seen.update(pids_in_pid_namespace(namespace))
                await anyio.sleep(0.02)

    async with ac.ServiceGroup() as group:
        started = anyio.current_time()
        async with anyio.create_task_group() as looking:
            looking.start_soon(look)
            with pytest.raises(TimeoutError):
                await group.start(spec)
        elapsed = anyio.current_time() - started
        assert 1 <= elapsed < 1 + 1.5
        assert seen
        await wait_gone(seen)
        namespace = (tmp_path / "ns").read_text().strip()
        assert pids_in_pid_namespace(namespace) == set()


async def test_service_exiting_before_its_pid_file_in_pid_namespace() -> None:
    # With an init, the service's end is seen at once: no waiting for the
    # PID file's timeout.
    spec = ac.ServiceSpec(sh("exit 3"), pid_file="/var/run/never.pid", pid_file_timeout=5)
    async with ac.ServiceGroup() as group:
        started = anyio.current_time()
        with pytest.raises(ac.ContainerError, match="status 3"):
            await group.start(spec)
        assert anyio.current_time() - started < 2
        assert group.services == ()


# -- stopping ------------------------------------------------------------------

IGNORES_TERM = "trap '' TERM; sleep 300 & wait"


@pytest.mark.parametrize("namespaces", [None, ["mnt"]], ids=["default", "mnt-only"])
async def test_service_ignoring_sigterm_is_killed_after_the_grace_period(
    namespaces: list[str] | None,
) -> None:
    keywords: dict[str, Any] = {} if namespaces is None else {"namespaces": namespaces}
    spec = ac.ServiceSpec(sh(IGNORES_TERM), grace_period=GRACE, **keywords)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        pid = service.pid
        assert pid is not None
        with anyio.fail_after(5):
            while not children_of(pid):
                await anyio.sleep(0.02)
        (sleeper,) = children_of(pid)
        victims = {pid, sleeper}
        if namespaces is None:
            victims |= pids_in_pid_namespace(namespace_of(pid, "pid"))
            assert len(victims) == 3  # the init, sh and sleep
        else:
            # Without a pid namespace, sh is the container's first process
            # and sleep is in its process group.
            assert os.getpgid(sleeper) == pid
        started = anyio.current_time()
        await service.stop()
        elapsed = anyio.current_time() - started
        assert GRACE <= elapsed < GRACE + 3
        assert not service.running
        await wait_gone(victims)


async def test_stop_returns_the_status_and_a_second_stop_the_same() -> None:
    spec = ac.ServiceSpec(["sleep", "300"], grace_period=GRACE)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        pid = service.pid
        assert pid is not None
        # -N for a signal, as without an init (its 128+N is translated).
        assert await service.stop() == -signal.SIGTERM
        assert await service.stop() == -signal.SIGTERM
        assert await service.wait() == -signal.SIGTERM
        assert service.returncode == -signal.SIGTERM
        await wait_gone([pid])


# -- what the container does before exec -------------------------------------


async def test_resource_limits(tmp_path: Path) -> None:
    status, lines = await run_service(
        tmp_path, sh("ulimit -n; ulimit -Sn; ulimit -Hn"), resource_limits={"nofile": 123}
    )
    assert (status, lines) == (0, ["123", "123", "123"])
    status, lines = await run_service(
        tmp_path,
        sh("ulimit -Sn; ulimit -Hn; ulimit -c"),
        resource_limits={"nofile": (100, 200), "RLIMIT_CORE": 0},
    )
    assert (status, lines) == (0, ["100", "200", "0"])


def test_bad_resource_limits() -> None:
    with pytest.raises(ValueError, match="no-such-limit"):
        ac.ServiceSpec(["true"], resource_limits={"no-such-limit": 1})
    with pytest.raises(ValueError):
        ac.ServiceSpec(["true"], resource_limits={"nofile": (200, 100)})
    with pytest.raises(TypeError):
        ac.ServiceSpec(["true"], resource_limits={"nofile": "many"})


async def test_file_creation_mask(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    status, lines = await run_service(
        tmp_path,
        sh("umask; echo x > /out/file; mkdir /out/directory"),
        mappings=[ac.FileSystemMapping(str(out), "/out", writable=True)],
        file_creation_mask=0o027,
    )
    assert (status, lines) == (0, ["0027"])
    assert stat.S_IMODE((out / "file").stat().st_mode) == 0o666 & ~0o027 == 0o640
    assert stat.S_IMODE((out / "directory").stat().st_mode) == 0o777 & ~0o027


IDS = "id -u; id -g; id -G"


async def test_user_drops_supplementary_groups(tmp_path: Path) -> None:
    status, lines = await run_service(tmp_path, sh(IDS), user="nobody")
    assert status == 0
    assert lines == [str(NOBODY.pw_uid), str(NOBODY.pw_gid), str(NOBODY.pw_gid)]
    assert NOBODY.pw_uid == 65534


async def test_numeric_user(tmp_path: Path) -> None:
    status, lines = await run_service(tmp_path, sh(IDS), user=NOBODY.pw_uid)
    assert (status, lines) == (0, [str(NOBODY.pw_uid), str(NOBODY.pw_gid), str(NOBODY.pw_gid)])


async def test_group_alone(tmp_path: Path) -> None:
    status, lines = await run_service(tmp_path, sh("id -u; id -g"), group="nogroup")
    assert (status, lines) == (0, ["0", "65534"])


async def test_supplementary_groups(tmp_path: Path) -> None:
    status, lines = await run_service(
        tmp_path, sh(IDS), user="nobody", supplementary_groups=["nogroup"]
    )
    assert (status, lines) == (0, ["65534", "65534", "65534"])
    # A group other than the user's own shows that the list is applied.
    status, lines = await run_service(
        tmp_path, sh(IDS), user="nobody", supplementary_groups=["daemon", 4]
    )
    assert status == 0
    assert lines[:2] == ["65534", "65534"]
    assert set(lines[2].split()) == {"65534", "1", "4"}


@pytest.mark.parametrize(
    "keywords",
    [
        {"user": "no-such-user-here"},
        {"group": "no-such-group-here"},
        {"user": "nobody", "supplementary_groups": ["nogroup", "no-such-group-here"]},
    ],
    ids=["user", "group", "supplementary"],
)
async def test_unknown_account_before_spawning(tmp_path: Path, keywords: dict[str, Any]) -> None:
    log = tmp_path / "never" / "service.log"
    spec = ac.ServiceSpec(["sleep", "300"], log_file=str(log), **keywords)
    async with ac.ServiceGroup() as group:
        before = fork_server_children()
        with pytest.raises(ac.UnknownAccountError, match="no-such-") as info:
            await group.start(spec)
        assert isinstance(info.value, KeyError)
        assert isinstance(info.value, ValueError)
        assert fork_server_children() == before
        assert group.services == ()
    # Looked up before anything else: not even the log file was made.
    assert not log.parent.exists()


# -- the log ---------------------------------------------------------------------

LOGGING_DAEMON = r"""
echo "to stdout"
echo "to stderr" >&2
printf 'bad \377 byte\n'
echo "after the bad byte"
echo "appended by the daemon itself" >> "$1"
echo "ready"
exec sleep 300
"""


async def test_log_file(tmp_path: Path) -> None:
    log = tmp_path / "made" / "for the log" / "daemon.log"
    spec = ac.ServiceSpec(sh(LOGGING_DAEMON, str(log)), log_file=str(log), user="nobody")
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert log.parent.is_dir()
        info = log.stat()
        assert stat.S_IMODE(info.st_mode) == 0o640
        assert (info.st_uid, info.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
        # Lines are written as they come: all of them are there while the
        # service still runs (sleeps).
        with anyio.fail_after(5):
            while not log.exists() or "ready" not in log.read_bytes().decode():
                await anyio.sleep(0.02)
        assert service.running
        lines = log_lines(log)
        await service.stop()
    direct = [line for line in lines if "appended by the daemon itself" in line]
    assert direct == ["appended by the daemon itself"]
    logged = messages([line for line in lines if line not in direct])
    assert logged == [
        "to stdout",
        "to stderr",
        "bad \N{REPLACEMENT CHARACTER} byte",
        "after the bad byte",
        "ready",
    ]


async def test_log_file_last_line_without_newline_and_appending(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("an older line\n")
    log.chmod(0o600)
    spec = ac.ServiceSpec(sh("echo first; printf 'no newline at the end'"), log_file=str(log))
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert await service.wait() == 0
    lines = log_lines(log)
    assert lines[0] == "an older line"
    assert messages(lines[1:]) == ["first", "no newline at the end"]
    # An existing log file is appended to, its mode left alone.
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


async def test_log_file_existing_directory_and_no_user(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    status, lines = await run_service(tmp_path, sh("echo one; echo two"))
    assert (status, lines) == (0, ["one", "two"])
    spec = ac.ServiceSpec(["echo", "hello"], log_file=str(log))
    async with ac.ServiceGroup() as group:
        await (await group.start(spec)).wait()
    info = log.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    assert messages(log_lines(log)) == ["hello"]


async def test_lines_go_to_the_logger_without_log_file(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asynccontainer.service")
    spec = ac.ServiceSpec(sh("echo hello; echo oops >&2; printf 'bad \\377\\n'; printf last"))
    assert spec.name == "sh"
    named = ac.ServiceSpec(["echo", "from the named one"], name="custom")
    async with ac.ServiceGroup() as group:
        for service in [await group.start(spec), await group.start(named)]:
            assert await service.wait() == 0
    records = [r for r in caplog.records if r.name == "asynccontainer.service.sh"]
    assert [r.getMessage() for r in records] == [
        "hello",
        "oops",
        "bad \N{REPLACEMENT CHARACTER}",
        "last",
    ]
    assert all(r.levelno == logging.INFO for r in records)
    records = [r for r in caplog.records if r.name == "asynccontainer.service.custom"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.INFO, "from the named one")]


def test_name_defaults_to_the_programs_base_name() -> None:
    assert ac.ServiceSpec(["/usr/bin/printf", "x"]).name == "printf"
    assert ac.ServiceSpec(["sleep", "1"]).name == "sleep"
    assert ac.ServiceSpec(["sleep", "1"], name="nap").name == "nap"


# -- respawn -------------------------------------------------------------------


async def test_respawn_and_its_throttle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asynccontainer.service")
    # Without a pid namespace, $$ is the service's host PID.
    spec = ac.ServiceSpec(
        sh("echo $$ >> /out/pids; exit 3"),
        name="flaky",
        namespaces=["mnt"],
        mappings=[ac.FileSystemMapping(str(tmp_path), "/out", writable=True)],
        respawn=True,
        grace_period=GRACE,
    )
    async with ac.ServiceGroup() as group:
        started = anyio.current_time()
        service = await group.start(spec)
        first = service.pid
        with anyio.fail_after(7):
            assert await service.wait() == 3
        assert anyio.current_time() - started < 7
        assert service.disabled
        assert not service.running
        assert service.returncode == 3
        # Started once, respawned 5 times: 6 deaths, more than 5 in 7 s.
        assert service.restarts == 5
        pids = [int(line) for line in (tmp_path / "pids").read_text().split()]
        assert len(pids) == len(set(pids)) == 6
        assert pids[0] == first
        assert pids[-1] == service.pid
        # Disabled: not started again.
        await anyio.sleep(0.3)
        assert service.restarts == 5
        assert len((tmp_path / "pids").read_text().split()) == 6
    await wait_gone(pids)
    errors = [
        r
        for r in caplog.records
        if r.name == "asynccontainer.service.flaky" and r.levelno == logging.ERROR
    ]
    assert len(errors) == 1
    assert "disabled" in errors[0].getMessage()


async def test_respawn_of_a_long_running_service() -> None:
    spec = ac.ServiceSpec(["sleep", "300"], respawn=True, grace_period=GRACE)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        old = service.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        with anyio.fail_after(5):
            while not (service.restarts == 1 and service.running):
                await anyio.sleep(0.02)
        new = service.pid
        assert new is not None
        assert new != old
        assert is_gone(old)
        assert is_alive(new)
        assert cmdline(new) == ["sleep", "300"]
        assert not service.disabled
        # A second service, stopped within the block, is not respawned.
        other = await group.start(spec)
        other_pid = other.pid
        assert other_pid is not None
        await other.stop()
        await anyio.sleep(0.3)
        assert other.restarts == 0
        assert not other.running
        await wait_gone([other_pid])
    # Leaving the group stops it, and it is not respawned afterwards.
    assert not service.running
    assert service.restarts == 1
    await wait_gone([new])
    with anyio.fail_after(1):
        await service.wait()


# -- namespaces and mounts -----------------------------------------------------


def test_default_namespaces() -> None:
    assert ac.default_namespaces() == frozenset(ac.NAMESPACES) - {"net", "user"}
    assert ac.default_namespaces() == {"cgroup", "mnt", "pid", "ipc", "uts"}
    assert ac.ServiceSpec(["true"]).namespaces == ac.default_namespaces()


async def test_service_namespaces(tmp_path: Path) -> None:
    log = tmp_path / "ns.log"
    script = "for ns in net mnt pid ipc uts user; do readlink /proc/self/ns/$ns; done; echo $$"
    spec = ac.ServiceSpec(sh(script + "; exec sleep 300"), log_file=str(log), grace_period=GRACE)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        pid = service.pid
        assert pid is not None
        # Without a PID file, the service's PID is its command's, which is
        # PID 2 in its namespace (the init is PID 1).
        assert nspid(pid) == [pid, 2]
        assert namespace_of(pid, "net") == namespace_of("self", "net")
        assert namespace_of(pid, "user") == namespace_of("self", "user")
        for kind in ("mnt", "pid", "ipc", "uts"):
            assert namespace_of(pid, kind) != namespace_of("self", kind)
        with anyio.fail_after(5):
            while len(log.read_text().splitlines()) < 7:
                await anyio.sleep(0.02)
        await service.stop()
    await wait_gone([pid])
    inside = messages(log_lines(log))
    net, mnt, pid_ns, ipc, uts, user, dollar = inside
    assert net == namespace_of("self", "net")
    assert user == namespace_of("self", "user")
    assert mnt != namespace_of("self", "mnt")
    assert pid_ns != namespace_of("self", "pid")
    assert ipc != namespace_of("self", "ipc")
    assert uts != namespace_of("self", "uts")
    assert dollar == "2"


def mount_points(mounts: Sequence[ac.FileSystem]) -> list[str]:
    return [m.mount_point for m in mounts]


def test_default_mounts() -> None:
    mounts = ac.default_mounts()
    assert all(isinstance(m, ac.FileSystem) for m in mounts)
    assert mounts[0] == ac.WRITABLE_TMP
    assert mounts[0].mount_point == "/tmp" and mounts[0].type == "tmpfs"
    assert mounts == ac.default_mounts(ac.default_namespaces())
    for fs in ac.CONTAINER_FILE_SYSTEMS:
        assert fs in mounts
    by_point = {m.mount_point: m for m in mounts}
    assert len(by_point) == len(mounts)
    for name in ("/etc/passwd", "/etc/group"):
        assert by_point[name].is_bind_mount
        assert "read-only" in by_point[name].flags
    for mapping in ac.NETWORK_FILE_MAPPINGS:
        if os.path.exists(mapping.source):
            assert by_point[mapping.target] == mapping.to_bind_mount()
    assert "read-only" in by_point["/etc/resolv.conf"].flags
    assert "/etc/localtime" in by_point
    assert "read-only" in by_point["/usr"].flags
    # Every bind mount's source exists.
    for m in mounts:
        if m.is_bind_mount:
            assert os.path.exists(m.device), m

    with_user = mount_points(ac.default_mounts(ac.default_namespaces() | {"user"}))
    assert "/etc/passwd" not in with_user and "/etc/group" not in with_user
    without_mnt = mount_points(ac.default_mounts(["pid"]))
    assert "/etc/passwd" not in without_mnt
    with_net = mount_points(ac.default_mounts(ac.default_namespaces() | {"net"}))
    for mapping in ac.NETWORK_FILE_MAPPINGS:
        assert mapping.target not in with_net
    assert "/etc/passwd" in with_net
    with pytest.raises(ValueError):
        ac.default_mounts(["mnt", "no-such-namespace"])


# -- groups of services ----------------------------------------------------------


def sleeper(index: int) -> ac.ServiceSpec:
    # Every other one ignores SIGTERM: stopping them all must be concurrent
    # to fit in one grace period.
    script = "trap '' TERM; exec sleep 300" if index % 2 else "exec sleep 300"
    return ac.ServiceSpec(sh(script), name=f"sleeper-{index}", grace_period=GRACE)


async def test_fifty_services_stopped_by_a_cancellation() -> None:
    services: list[ac.Service] = []
    stopping = 0.0
    with anyio.move_on_after(60) as scope:
        async with ac.ServiceGroup() as group:

            async def start(index: int) -> None:
                services.append(await group.start(sleeper(index)))

            async with anyio.create_task_group() as starters:
                for index in range(50):
                    starters.start_soon(start, index)
            assert len(services) == len(group.services) == 50
            assert all(service.running for service in services)
            pids = [service.pid for service in services]
            assert None not in pids
            assert len(set(pids)) == 50
            # A timeout around the whole group, expiring now.
            stopping = anyio.current_time()
            scope.deadline = stopping + 0.05
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    elapsed = anyio.current_time() - stopping
    # Concurrently: the ones ignoring SIGTERM wait one grace period, not 25.
    assert GRACE <= elapsed < GRACE + 5
    assert not any(service.running for service in services)
    await wait_gone(pid for pid in pids if pid is not None)


async def test_fail_after_around_the_group() -> None:
    services: list[ac.Service] = []
    with pytest.raises(TimeoutError):
        with anyio.fail_after(30) as scope:
            async with ac.ServiceGroup() as group:

                async def start(index: int) -> None:
                    await group.start(sleeper(index))

                async with anyio.create_task_group() as starters:
                    for index in range(5):
                        starters.start_soon(start, index)
                services.extend(group.services)
                scope.deadline = anyio.current_time()
                await anyio.sleep_forever()
    assert len(services) == 5
    await wait_gone(service.pid for service in services if service.pid is not None)


async def test_exception_in_the_block_stops_every_service() -> None:
    services: list[ac.Service] = []
    with pytest.raises(RuntimeError, match="boom in the block"):
        async with ac.ServiceGroup() as group:
            for index in range(3):
                services.append(await group.start(sleeper(index)))
            assert all(service.running for service in services)
            raise RuntimeError("boom in the block")
    assert not any(service.running for service in services)
    await wait_gone(service.pid for service in services if service.pid is not None)


async def test_leaving_the_block_stops_every_service() -> None:
    async with ac.ServiceGroup() as group:
        services = [await group.start(sleeper(index)) for index in range(3)]
        pids = [service.pid for service in services]
        assert all(service.running for service in services)
    assert not any(service.running for service in services)
    assert all(service.returncode is not None for service in services)
    await wait_gone(pid for pid in pids if pid is not None)
    with pytest.raises(RuntimeError):
        await group.start(sleeper(0))


async def test_services_exiting_at_once_started_concurrently() -> None:
    # Their containers may be gone before start() looks for their PIDs:
    # starting is still a success, and wait() gives the status.
    statuses: list[int] = []
    with anyio.fail_after(20):
        async with ac.ServiceGroup() as group:

            async def run(index: int) -> None:
                service = await group.start(ac.ServiceSpec(sh(f"exit {index % 3}")))
                statuses.append(await service.wait() - index % 3)

            async with anyio.create_task_group() as starters:
                for index in range(30):
                    starters.start_soon(run, index)
    assert statuses == [0] * 30


# -- bad input -------------------------------------------------------------------


def test_bad_specs() -> None:
    with pytest.raises(ValueError, match="relative"):
        ac.ServiceSpec(["true"], pid_file="var/run/x.pid")
    with pytest.raises(ValueError, match="relative"):
        ac.ServiceSpec(["true"], log_file="service.log")
    with pytest.raises(ValueError, match="relative"):
        ac.ServiceSpec(["true"], directory="srv")
    for timeout in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="pid_file_timeout"):
            ac.ServiceSpec(["true"], pid_file="/var/run/x.pid", pid_file_timeout=timeout)
    with pytest.raises(ValueError, match="grace_period"):
        ac.ServiceSpec(["true"], grace_period=-1)
    with pytest.raises(TypeError):
        ac.ServiceSpec("sleep 10")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ac.ServiceSpec([])
    with pytest.raises(ValueError):
        ac.ServiceSpec(["true"], namespaces=["no-such-namespace"])
    with pytest.raises(ValueError):
        ac.ServiceSpec(["true"], file_creation_mask=0o1000)
    with pytest.raises(TypeError):
        ac.ServiceSpec(["true"], user=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ac.ServiceSpec(["true"], mappings=["/srv"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ac.ServiceSpec(["true"], environment={"A=B": "c"})
    spec = ac.ServiceSpec(["true"])
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.respawn = True  # type: ignore[misc]


@pytest.mark.parametrize("namespaces", [None, ["mnt"]], ids=["default", "mnt-only"])
async def test_missing_directory(namespaces: list[str] | None) -> None:
    keywords: dict[str, Any] = {} if namespaces is None else {"namespaces": namespaces}
    spec = ac.ServiceSpec(
        ["sleep", "300"], directory="/no/such/directory", grace_period=GRACE, **keywords
    )
    async with ac.ServiceGroup() as group:
        before = fork_server_children()
        with pytest.raises(FileNotFoundError):
            await group.start(spec)
        assert group.services == ()
        assert fork_server_children() == before
        # The group still works after a failed start.
        service = await group.start(ac.ServiceSpec(["sleep", "300"], grace_period=GRACE))
        assert service.running


async def test_existing_directory(tmp_path: Path) -> None:
    status, lines = await run_service(tmp_path, ["pwd"], directory="/usr/lib")
    assert (status, lines) == (0, ["/usr/lib"])


async def test_log_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    spec = ac.ServiceSpec(["sleep", "300"], log_file=str(blocker / "sub" / "service.log"))
    async with ac.ServiceGroup() as group:
        before = fork_server_children()
        with pytest.raises(NotADirectoryError):
            await group.start(spec)
        assert fork_server_children() == before
        assert group.services == ()


@pytest.mark.parametrize("namespaces", [None, ["mnt"]], ids=["default", "mnt-only"])
async def test_command_not_found(namespaces: list[str] | None) -> None:
    keywords: dict[str, Any] = {} if namespaces is None else {"namespaces": namespaces}
    spec = ac.ServiceSpec(["no-such-program-anywhere"], grace_period=GRACE, **keywords)
    async with ac.ServiceGroup() as group:
        before = fork_server_children()
        with pytest.raises(FileNotFoundError, match="no-such-program-anywhere"):
            await group.start(spec)
        assert group.services == ()
        assert fork_server_children() == before


async def test_group_misuse() -> None:
    spec = ac.ServiceSpec(["sleep", "300"], grace_period=GRACE)
    group = ac.ServiceGroup()
    with pytest.raises(RuntimeError, match="async with"):
        await group.start(spec)
    async with group:
        with pytest.raises(TypeError):
            await group.start(["sleep", "300"])  # type: ignore[arg-type]
        assert group.services == ()
    with pytest.raises(RuntimeError):
        await group.start(spec)
    with pytest.raises(RuntimeError):
        async with group:
            pass


# -- environment and exit status -----------------------------------------------


async def test_environment_of_the_caller_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCCONTAINER_SERVICE_TEST", "from the caller")
    status, lines = await run_service(tmp_path, ["env"])
    assert status == 0
    assert "ASYNCCONTAINER_SERVICE_TEST=from the caller" in lines
    assert f"PATH={os.environ['PATH']}" in lines


async def test_environment_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCCONTAINER_SERVICE_TEST", "from the caller")
    status, lines = await run_service(
        tmp_path, ["/usr/bin/env"], environment={"ONLY": "this", "AND": "that one"}
    )
    assert (status, sorted(lines)) == (0, ["AND=that one", "ONLY=this"])


@pytest.mark.parametrize("namespaces", [None, ["mnt"]], ids=["default", "mnt-only"])
async def test_wait_returns_the_exit_status(namespaces: list[str] | None) -> None:
    keywords: dict[str, Any] = {} if namespaces is None else {"namespaces": namespaces}
    async with ac.ServiceGroup() as group:
        service = await group.start(ac.ServiceSpec(sh("exit 7"), **keywords))
        with anyio.fail_after(5):
            assert await service.wait() == 7
        assert service.returncode == 7
        assert not service.running
        assert not service.disabled
        # Stopping a service that is down returns its status.
        assert await service.stop() == 7


async def test_wait_reports_a_signal_as_minus_n_with_an_init() -> None:
    async with ac.ServiceGroup() as group:
        service = await group.start(ac.ServiceSpec(sh("kill -USR1 $$")))
        with anyio.fail_after(5):
            assert await service.wait() == -signal.SIGUSR1


async def test_an_exit_status_above_128_is_not_taken_for_a_signal() -> None:
    """`exit 143` is 143: only the init's own report of a signal makes -N."""
    async with ac.ServiceGroup() as group:
        service = await group.start(ac.ServiceSpec(sh("exit 143")))
        with anyio.fail_after(5):
            assert await service.wait() == 143
    status = await ac.call_with_container(
        sh("exit 137"), mounts=ac.HOST_SYSTEM_MAPPINGS, child_is_pid1=False
    )
    assert status == 137


async def test_a_forged_status_byte_changes_nothing_but_what_the_status_says() -> None:
    """A container that writes on its init's status pipe (through /proc/1/fd) cannot
    make an exit look like another signal: only a byte agreeing with 128+N counts."""
    script = "for fd in /proc/1/fd/*; do printf '\\011' > $fd 2>/dev/null; done; exit 130"
    status = await ac.call_with_container(
        ["sh", "-c", script], mounts=ac.HOST_SYSTEM_MAPPINGS, child_is_pid1=False
    )
    assert status == 130


async def test_the_main_process_ending_ends_the_service_and_stops_the_rest() -> None:
    """systemd's rule: the command (the main process) exits 3, and its forked child,
    which would run for a minute, is stopped with the stop signal; the service's
    returncode is the main process's (through the init, which reaps both)."""
    async with ac.ServiceGroup() as group:
        service = await group.start(
            ac.ServiceSpec(sh("sleep 60 & echo $! > /run/child; exit 3"), grace_period=10)
        )
        with anyio.fail_after(5):
            assert await service.wait() == 3
        assert service.state == "failed"


@pytest.mark.parametrize("namespaces", [None, ["mnt"]], ids=["default", "mnt-only"])
async def test_leaving_a_group_after_the_fork_server_died(namespaces: list[str] | None) -> None:
    """The group raises ContainerError at once; it once waited forever for the services' end.

    Every process of the services dies with the server (PR_SET_PDEATHSIG);
    the watchers must see the end, and no wait of the stop path is unbounded.
    """
    keywords: dict[str, Any] = {} if namespaces is None else {"namespaces": namespaces}
    with anyio.fail_after(15):
        with pytest.raises(ac.ContainerError, match="fork server"):
            async with ac.ServiceGroup() as group:
                services = [
                    await group.start(ac.ServiceSpec(["sleep", "60"], **keywords)) for _ in range(3)
                ]
                server = _client._server
                assert server is not None
                os.kill(server.pid, signal.SIGKILL)
                await anyio.to_thread.run_sync(server.process.wait)
    for service in services:
        assert service.returncode == -signal.SIGKILL
        assert not service.running
    # The dead server's control socket goes at the next start, or here.
    ac.shutdown_fork_server()


async def test_a_start_racing_the_groups_exit_leaves_nothing_running(tmp_path: Path) -> None:
    """group.start() in a task that outlives the group's block once left a container nobody owned.

    The exit now cancels the start, which stops what it had started, and the
    start raises a clear RuntimeError.
    """
    script = "sleep 0.5; echo $$ > /var/run/late.pid; exec sleep 60"
    spec = ac.ServiceSpec(["sh", "-c", script], pid_file="/var/run/late.pid")
    results: list[BaseException | ac.Service] = []

    async def start(group: ac.ServiceGroup) -> None:
        try:
            results.append(await group.start(spec))
        except RuntimeError as exc:
            results.append(exc)

    with anyio.fail_after(15):
        async with anyio.create_task_group() as outer, ac.ServiceGroup() as group:
            outer.start_soon(start, group)
            with anyio.fail_after(5):
                while not fork_server_containers():
                    await anyio.sleep(0.005)
            # The group's block is left while the start waits for its PID file.
    [outcome] = results
    assert isinstance(outcome, RuntimeError)
    assert "was left while service 'sh' started; it was stopped" in str(outcome)
    assert fork_server_containers() == set()


def inotify_instances() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify"
        except OSError:
            pass
    return count


@pytest.mark.timeout(120)
async def test_two_hundred_services_with_pid_files_share_one_inotify_instance() -> None:
    """One inotify instance per wait once made 72 of 200 starts fail (128 instances per user)."""
    script = "sleep 0.5; echo $$ > /var/run/s.pid; exec sleep 60"
    spec = ac.ServiceSpec(["sh", "-c", script], pid_file="/var/run/s.pid", pid_file_timeout=60)
    most = 0
    started: list[ac.Service] = []

    async def count() -> None:
        nonlocal most
        while True:
            most = max(most, inotify_instances())
            await anyio.sleep(0.005)

    async def start(group: ac.ServiceGroup) -> None:
        started.append(await group.start(spec))

    async with ac.ServiceGroup() as group:
        async with anyio.create_task_group() as watcher:
            watcher.start_soon(count)
            async with anyio.create_task_group() as starters:
                for _ in range(200):
                    starters.start_soon(start, group)
            watcher.cancel_scope.cancel()
        assert len(started) == 200
        assert all(service.running for service in started)
    # At most one: another process may hold the per-user instances, and the
    # waits then poll instead (which started all 200 all the same).
    assert most <= 1, most


async def test_an_exception_leaves_the_group_as_it_is() -> None:
    """The tutorial's promise: a plain `except` catches it (no ExceptionGroup)."""
    with pytest.raises(LookupError, match="from the block") as caught:
        async with ac.ServiceGroup() as group:
            service = await group.start(ac.ServiceSpec(["sleep", "60"]))
            raise LookupError("from the block")
    assert type(caught.value) is LookupError
    assert service.returncode is not None  # stopped on the way out
