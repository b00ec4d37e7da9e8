"""Dependencies between services: `requires` and `ServiceGroup.start_all`, under both backends."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import asynccontainer as ac

GRACE = 2.0

NOTIFY = (
    "import os, socket, sys, time\n"
    "def notify(text):\n"
    "    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:\n"
    "        s.sendto(text.encode(), os.environ['NOTIFY_SOCKET'])\n"
)


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def spec(name: str, command: list[str], shared: Path, **keywords: object) -> ac.ServiceSpec:
    return ac.ServiceSpec(
        command,
        name=name,
        mappings=[ac.FileSystemMapping(str(shared), "/shared", writable=True)],
        grace_period=GRACE,
        **keywords,  # type: ignore[arg-type]
    )


async def test_dependency_order_concurrency_and_reverse_stop(tmp_path: Path) -> None:
    """db is ready only once cache (independent, listed last) runs: start_all must start
    them concurrently. web requires db and sees its mark; at the end web stops first."""
    db_script = (
        NOTIFY + "while not os.path.exists('/shared/cache-up'): time.sleep(0.01)\n"
        "time.sleep(0.3)\n"
        "open('/shared/db-ready', 'w').close()\n"
        "import signal\n"
        "def term(*_):\n"
        "    open('/shared/stops', 'a').write('db\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "notify('READY=1')\n"
        "while True: time.sleep(60)\n"
    )
    web_script = (
        "trap 'echo web >> /shared/stops; exit 0' TERM; "
        "test -e /shared/db-ready && echo db was ready; "
        "while :; do sleep 0.05; done"
    )
    specs = [
        spec("db", ["/usr/bin/python3", "-c", db_script], tmp_path, notify=True, start_timeout=20),
        spec("web", sh(web_script), tmp_path, requires=["db"]),
        spec("cache", sh("touch /shared/cache-up; exec sleep 60"), tmp_path),
    ]
    async with ac.ServiceGroup() as group:
        with anyio.fail_after(30):
            db, web, cache = await group.start_all(specs)
        assert [s.name for s in (db, web, cache)] == ["db", "web", "cache"]
        with anyio.fail_after(10):
            while "db was ready" not in web.recent_log:
                await anyio.sleep(0.01)
    assert (tmp_path / "stops").read_text() == "web\ndb\n"


async def test_a_cycle_or_an_unknown_name_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    mark = tmp_path / "started"
    command = sh(f"touch {mark}; exec sleep 60")
    async with ac.ServiceGroup() as group:
        cycle = [
            ac.ServiceSpec(command, name="a", requires=["c"]),
            ac.ServiceSpec(command, name="b", requires=["a"]),
            ac.ServiceSpec(command, name="c", requires=["b"]),
            ac.ServiceSpec(command, name="free"),
        ]
        with pytest.raises(ValueError, match=r"cycle \((a|b|c) -> .* -> \1\)"):
            await group.start_all(cycle)
        with pytest.raises(ValueError, match="requires 'nope', which is neither"):
            await group.start_all([ac.ServiceSpec(command, name="a", requires=["nope"])])
        with pytest.raises(ValueError, match="two services are named 'a'"):
            await group.start_all([ac.ServiceSpec(command, name="a")] * 2)
        with pytest.raises(ValueError, match="not running in the group"):
            await group.start(ac.ServiceSpec(command, name="b", requires=["a"]))
        assert group.services == ()
    assert not mark.exists()


def test_requires_itself_or_badly_typed() -> None:
    with pytest.raises(ValueError, match="requires itself"):
        ac.ServiceSpec(["true"], name="x", requires=["x"])
    with pytest.raises(TypeError, match="requires is a sequence of"):
        ac.ServiceSpec(["true"], requires="db")  # type: ignore[arg-type]


async def test_a_failed_dependency_fails_what_requires_it(tmp_path: Path) -> None:
    """db dies before its PID file: web (requires db) never starts, cache (started
    meanwhile) is stopped again, and the error says which were left unstarted."""
    web_mark = tmp_path / "web"
    specs = [
        ac.ServiceSpec(sh("echo no disk; exit 3"), name="db", pid_file="/run/db.pid"),
        ac.ServiceSpec(sh(f"touch {web_mark}; exec sleep 60"), name="web", requires=["db"]),
        ac.ServiceSpec(sh("exec sleep 60"), name="cache", grace_period=GRACE),
    ]
    async with ac.ServiceGroup() as group:
        with anyio.fail_after(20), pytest.raises(ac.ServiceStartError) as caught:
            await group.start_all(specs)
        assert caught.value.returncode == 3
        assert any("were not started: web" in note for note in caught.value.__notes__)
        cache = next(s for s in group.services if s.name == "cache")
        assert cache.state == "stopped"
    assert not web_mark.exists()


async def test_start_with_requires_after_its_dependency() -> None:
    async with ac.ServiceGroup() as group:
        first = await group.start(ac.ServiceSpec(sh("exec sleep 60"), name="first"))
        second = await group.start(
            ac.ServiceSpec(sh("exec sleep 60"), name="second", requires=["first"])
        )
        assert first.running and second.running
