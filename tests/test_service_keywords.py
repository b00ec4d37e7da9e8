"""The service keywords real daemons need: directories, /run, stop and reload signals, restarts.

Each with a small script as the daemon, under both backends; the real
daemons are in test_daemons.py.
"""

from __future__ import annotations

import os
import pwd
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import asynccontainer as ac

NOBODY = pwd.getpwnam("nobody")
GRACE = 0.5


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


async def until_logged(service: ac.Service, text: str, times: int = 1, timeout: float = 10) -> None:
    """Wait until `times` lines of the service's output hold `text`."""
    with anyio.fail_after(timeout):
        while sum(text in line for line in service.recent_log) < times:
            await anyio.sleep(0.01)


@pytest.fixture
def name() -> Iterator[str]:
    """A directory name no other test uses; its state, cache and logs directories removed after."""
    unique = f"ac-test-{uuid.uuid4().hex[:8]}"
    yield unique
    for base in ("/run", "/var/lib", "/var/cache", "/var/log"):
        path = Path(base) / unique
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            for below in sorted(path.rglob("*"), reverse=True):
                below.rmdir() if below.is_dir() and not below.is_symlink() else below.unlink()
            path.rmdir()


# -- directories and /run ------------------------------------------------------------


async def test_the_four_kinds_of_directories(name: str) -> None:
    script = (
        f"for d in /run/{name} /var/lib/{name} /var/cache/{name} /var/log/{name}/deep; do "
        "echo x > $d/file && echo wrote $d; done; echo done; exec sleep 60"
    )
    spec = ac.ServiceSpec(
        sh(script),
        user="nobody",
        runtime_directories=[name],
        state_directories=[name],
        cache_directories=[name],
        logs_directories=[f"{name}/deep"],
        grace_period=GRACE,
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        await until_logged(service, "done")
        assert sum("wrote" in line for line in service.recent_log) == 4, service.recent_log
        for path in (f"/run/{name}", f"/var/lib/{name}", f"/var/cache/{name}"):
            info = os.stat(path)
            assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (
                NOBODY.pw_uid,
                NOBODY.pw_gid,
                0o755,
            ), path
        # The innermost is the service's; the one above it stays root's.
        assert os.stat(f"/var/log/{name}/deep").st_uid == NOBODY.pw_uid
        assert os.stat(f"/var/log/{name}").st_uid == 0
    # Runtime directories go with the service, the others stay (systemd's rule).
    assert not os.path.exists(f"/run/{name}")
    assert Path(f"/var/lib/{name}/file").read_text() == "x\n"


async def test_a_writable_run_with_var_run_linked_to_it() -> None:
    script = "echo $$ > /var/run/d.pid && readlink /var/run && cat /run/d.pid >/dev/null && echo ok"
    async with ac.ServiceGroup() as group:
        service = await group.start(ac.ServiceSpec(sh(script)))
        assert await service.wait() == 0
    assert service.recent_log == ["../run", "ok"]


async def test_a_link_planted_where_a_directory_goes_is_refused(name: str, tmp_path: Path) -> None:
    """A service that left a link in place of its state directory gets nothing outside."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.symlink(target, f"/var/lib/{name}")
    spec = ac.ServiceSpec(["true"], user="nobody", state_directories=[name])
    async with ac.ServiceGroup() as group:
        with pytest.raises(OSError) as caught:
            await group.start(spec)
    assert caught.value.filename == f"/var/lib/{name}"
    assert os.stat(target).st_uid == 0  # not chowned to the service's user


async def test_a_directory_above_that_is_not_roots_alone_is_refused(name: str) -> None:
    """/var/lib/NAME owned by the service could become a link before NAME/inner is made."""
    os.mkdir(f"/var/lib/{name}")
    os.chown(f"/var/lib/{name}", NOBODY.pw_uid, NOBODY.pw_gid)
    spec = ac.ServiceSpec(["true"], user="nobody", state_directories=[f"{name}/inner"])
    async with ac.ServiceGroup() as group:
        with pytest.raises(PermissionError, match="not root's alone"):
            await group.start(spec)
    assert not os.path.exists(f"/var/lib/{name}/inner")


# -- signals, reload, restart ----------------------------------------------------------

TRAPS = (
    "trap 'echo got QUIT; exit 0' QUIT; trap 'echo got HUP' HUP; trap 'echo got USR1' USR1; "
    "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.05; done"
)


async def test_the_stop_signal_and_the_reload_signal() -> None:
    spec = ac.ServiceSpec(sh(TRAPS), stop_signal="SIGQUIT", reload_signal=signal.SIGUSR1)
    assert (spec.stop_signal, spec.reload_signal) == (signal.SIGQUIT, signal.SIGUSR1)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        await until_logged(service, "ready")
        await service.reload()
        await until_logged(service, "got USR1")
        service.send_signal(signal.SIGHUP)
        await until_logged(service, "got HUP")
        assert service.state == "running"
        assert await service.stop() == 0
    assert "got QUIT" in service.recent_log and "got TERM" not in service.recent_log
    assert service.state == "stopped"


async def test_restart_starts_it_again() -> None:
    async with ac.ServiceGroup() as group:
        service = await group.start(ac.ServiceSpec(sh(TRAPS), grace_period=GRACE))
        first = service.pid
        await until_logged(service, "ready")
        await service.restart()
        assert service.running and service.pid != first
        assert service.state == "running"
        assert service.restarts == 0  # a restart asked for is not a respawn
        await until_logged(service, "ready", times=2)
    assert service.recent_log.count("got TERM") == 2


async def test_restart_of_a_stopped_service_is_refused() -> None:
    async with ac.ServiceGroup() as group:
        service = await group.start(ac.ServiceSpec(["true"]))
        await service.wait()
        with pytest.raises(RuntimeError, match="start a new one"):
            await service.restart()


async def test_respawn_limit_and_delay() -> None:
    spec = ac.ServiceSpec(
        sh("echo run; exit 3"), respawn=True, respawn_limit=(2, 60), respawn_delay=0.05
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        with anyio.fail_after(10):
            assert await service.wait() == 3
    assert service.disabled and service.state == "failed"
    assert service.restarts == 2  # three runs: the first, and two respawns
    assert service.recent_log.count("run") == 3


# -- starts that fail ----------------------------------------------------------------


async def test_a_daemon_that_dies_before_its_pid_file_raises_at_once() -> None:
    script = "echo reading /etc/d.conf; echo 'error: bad line 3' >&2; exit 4"
    spec = ac.ServiceSpec(sh(script), pid_file="/run/d.pid", pid_file_timeout=50)
    async with ac.ServiceGroup() as group:
        with anyio.fail_after(20), pytest.raises(ac.ServiceStartError) as caught:
            await group.start(spec)
    error = caught.value
    assert isinstance(error, ac.ContainerError)
    assert error.returncode == 4
    assert error.log == ["reading /etc/d.conf", "error: bad line 3"]
    assert str(error).endswith("its last line: error: bad line 3")


@pytest.mark.parametrize(
    ("keywords", "error", "text"),
    [
        ({"runtime_directories": ["../etc"]}, ValueError, "not a relative directory name"),
        ({"state_directories": ["/abs"]}, ValueError, "not a relative directory name"),
        ({"cache_directories": "one"}, TypeError, "sequence of names"),
        ({"logs_directories": ["a", "a"]}, ValueError, "twice"),
        ({"stop_signal": signal.SIGWINCH}, ValueError, "not one the init"),
        ({"stop_signal": "SIGNOPE"}, ValueError, "not the name of a signal"),
        ({"reload_signal": signal.SIGKILL}, ValueError, "not a signal a service can handle"),
        ({"respawn_limit": (0, 1.0)}, ValueError, "respawn_limit"),
        ({"respawn_limit": 5}, TypeError, "respawn_limit"),
        ({"respawn_delay": -1}, ValueError, "respawn_delay"),
        (
            {"runtime_directories": ["x"], "namespaces": ["pid"]},
            ValueError,
            "runtime_directories",
        ),
    ],
)
def test_bad_keywords(keywords: dict[str, object], error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        ac.ServiceSpec(["true"], **keywords)  # type: ignore[arg-type]


def test_a_signal_outside_the_inits_set_without_a_pid_namespace() -> None:
    spec = ac.ServiceSpec(["true"], stop_signal=signal.SIGWINCH, namespaces=["mnt"])
    assert spec.stop_signal == signal.SIGWINCH
