"""No file of the host outside the exposed mappings is reachable from a container.

Every test here runs containers with the defaults of `run_container` (plus
the host's programs, mapped read-only) and tries the known ways out: the
/proc magic links (`/proc/PID/root`, `cwd`, `exe`, `fd/N`), `..` walked out of
the root or out of a bind mount, and what the caller's process itself might
carry in (its environment). Where a probe could pass by probing the wrong
thing, a control shows that the same probe does reach the file once it is
mapped (or passed in). Tests marked xfail(strict=True) are known gaps: each
fails today, and its mark must go when the gap is closed.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from capture import output_of, outside_tmp_directory, sh

import asynccontainer as ac
from asynccontainer._core import client as _client

SYSTEM = ac.HOST_SYSTEM_MAPPINGS
UP = "../" * 20  # more than enough to climb from any path used here to "/"


@pytest.fixture(params=["under-tmp", "outside-tmp"])
def host_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A 0700 host directory, in /tmp (where the set-up mounts the new root) or in /var/tmp."""
    if request.param == "under-tmp":
        yield tmp_path
        return
    with outside_tmp_directory() as directory:
        yield directory


class Layout:
    """host_dir/hidden/secret (never mapped unless a control says so) and host_dir/exposed."""

    def __init__(self, base: Path) -> None:
        self.token = secrets.token_hex(16)
        self.hidden = base / "hidden"
        self.secret = self.hidden / "secret"
        self.exposed = base / "exposed"
        self.hidden.mkdir()
        self.exposed.mkdir()
        self.secret.write_text(f"secret-{self.token}\n")
        (self.exposed / "file").write_text("exposed\n")

    def mappings(self, *, with_secret: bool) -> list[ac.MountItem]:
        items: list[ac.MountItem] = [
            *SYSTEM,
            # Once at a path of its own, once at its host path, next to
            # where the hidden directory is on the host.
            ac.FileSystemMapping(str(self.exposed), "/mapped"),
            ac.FileSystemMapping(str(self.exposed)),
        ]
        if with_secret:
            items += [
                ac.FileSystemMapping(str(self.hidden)),
                ac.FileSystemMapping(str(self.hidden), "/hidden"),
            ]
        return items


def escape_probes(layout: Layout) -> dict[str, str]:
    """Shell snippets, each printing the secret if it can reach it, and failing otherwise."""
    secret = shlex.quote(str(layout.secret))
    relative = shlex.quote(str(layout.secret).lstrip("/"))
    hidden = shlex.quote(str(layout.hidden))
    exposed = shlex.quote(str(layout.exposed))
    return {
        "absolute path": f"cat {secret}",
        "/proc/1/root": f"cat /proc/1/root{secret}",
        "/proc/self/root": f"cat /proc/self/root{secret}",
        "/proc/1/cwd": f"cat /proc/1/cwd{secret}",
        "ls /proc/1/cwd": f"ls /proc/1/cwd{hidden}",
        "/proc/self/cwd/..": f"cd -P /mapped && cat /proc/self/cwd/{UP}{relative}",
        "cd .. from /": f"cd -P / && for i in $(seq 30); do cd -P ..; done && cat {relative}",
        "cd .. out of a mapping": f"cd -P /mapped/{UP} && cat {relative}",
        "relative .. out of a mapping": f"cd -P /mapped && cat {UP}{relative}",
        "absolute .. out of a mapping": f"cat /mapped/{UP}{relative}",
        "sibling of a mapping, cd": f"cd -P {exposed} && cat ../hidden/secret",
        "sibling of a mapping, path": f"cat {exposed}/../hidden/secret",
        "sibling of /mapped": "cat /mapped/../hidden/secret",
        "fd of a mapping, ..": f"exec 3</mapped && cat /proc/self/fd/3/{UP}{relative}",
        "fd of a mapping, sibling": "exec 3</mapped && cat /proc/self/fd/3/../hidden/secret",
    }


def probe_script(probes: dict[str, str]) -> str:
    """Run each probe in a subshell; print "READ name" or "absent name", then what it printed."""
    lines = []
    for name, snippet in probes.items():
        label = shlex.quote(name)
        lines.append(
            f'if out=$( {{ {snippet} ; }} 2>&1 ); then echo "READ "{label}; '
            f'else echo "absent "{label}; fi; printf "%s\\n" "$out"'
        )
    return "\n".join(lines)


def verdicts(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        word, _, name = line.partition(" ")
        if word in ("READ", "absent"):
            found[name] = word
    return found


async def test_unmapped_host_file_is_unreachable(host_dir: Path) -> None:
    """/proc/PID/root, cwd and fd links and `..` out of / or a bind mount stay inside.

    Guards against `..` traversal out of a bind mount (Docker's `..` bind escapes)
    and the /proc/self/cwd and /proc/self/fd/N routes of CVE-2024-21626.
    """
    layout = Layout(host_dir)
    probes = escape_probes(layout)
    returncode, out = await sh(
        probe_script(probes), mounts=layout.mappings(with_secret=False), with_stderr=True
    )
    assert returncode == 0, out
    assert layout.token not in out
    assert verdicts(out) == dict.fromkeys(probes, "absent"), out


async def test_the_same_probes_read_the_secret_once_mapped(host_dir: Path) -> None:
    """The control: with the secret's directory mapped, every probe reads it.

    So each probe above does reach the file whenever the path leads to it.
    """
    layout = Layout(host_dir)
    probes = escape_probes(layout)
    returncode, out = await sh(
        probe_script(probes), mounts=layout.mappings(with_secret=True), with_stderr=True
    )
    assert returncode == 0, out
    assert layout.token in out
    assert verdicts(out) == dict.fromkeys(probes, "READ"), out


# For every absolute target of a /proc/PID/{cwd,root,exe,fd/N} link, check
# that the same path inside the container is the very same file (device and
# inode): a link naming a file the container cannot reach by its path is
# how a leaked host fd or cwd shows (CVE-2024-21626).
MAGIC_LINKS = r"""
exec 3</mapped 4</mapped/file
cd /mapped
for link in /proc/[0-9]*/cwd /proc/[0-9]*/root /proc/[0-9]*/exe /proc/[0-9]*/fd/*; do
    target=$(readlink "$link") || continue
    case $target in
    /*)
        linked=$(stat -L -c %d:%i "$link" 2>/dev/null)
        named=$(stat -c %d:%i "$target" 2>/dev/null)
        if [ -n "$linked" ] && [ "$linked" = "$named" ]; then
            echo "inside $link -> $target"
        else
            echo "OUTSIDE $link -> $target"
        fi
        ;;
    esac
done
"""


async def test_proc_links_name_only_files_inside(tmp_path: Path) -> None:
    """Every /proc/PID/{cwd,root,exe,fd/N} link names a path inside leading to that file.

    Guards against a host fd or cwd leaking in (CVE-2024-21626, runc's leaked
    cgroup fd used as the working directory).
    """
    layout = Layout(tmp_path)
    returncode, out = await sh(
        MAGIC_LINKS, mounts=layout.mappings(with_secret=False), with_stderr=True
    )
    assert returncode == 0, out
    assert "OUTSIDE" not in out, out
    # Not vacuous: the shell's own links were checked.
    for line in (
        "inside /proc/1/cwd -> /mapped",
        "inside /proc/1/root -> /",
        "inside /proc/1/fd/3 -> /mapped",
        "inside /proc/1/fd/4 -> /mapped/file",
    ):
        assert line in out.splitlines(), out


async def test_a_host_fd_passed_in_is_seen_by_the_link_check(tmp_path: Path) -> None:
    """The control: a host directory's fd given with pass_fds shows as OUTSIDE, and leaks.

    So the check above would catch a CVE-2024-21626-style leaked fd.
    """
    layout = Layout(tmp_path)
    opened = os.open(layout.hidden, os.O_RDONLY | os.O_DIRECTORY)
    try:
        number = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, 20)
    finally:
        os.close(opened)
    try:
        returncode, out = await sh(
            MAGIC_LINKS + f"cat /proc/self/fd/{number}/secret",
            mounts=layout.mappings(with_secret=False),
            pass_fds=[number],
            with_stderr=True,
        )
    finally:
        os.close(number)
    assert returncode == 0, out
    assert f"OUTSIDE /proc/1/fd/{number} -> {layout.hidden}" in out.splitlines(), out
    assert layout.token in out


# --- The caller's environment ----------------------------------------------

CANARY = "ASYNCCONTAINER_TEST_CANARY"


def fork_server_environment() -> dict[str, str]:
    server = _client._server
    assert server is not None and server.alive()
    with open(f"/proc/{server.pid}/environ", "rb") as file:
        entries = file.read().decode(errors="replace").split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


@pytest.fixture
def canary_in_fork_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A secret in the caller's environment when the fork server starts."""
    value = secrets.token_hex(16)
    monkeypatch.setenv(CANARY, value)
    ac.shutdown_fork_server()  # the next container starts one with the variable
    yield value
    ac.shutdown_fork_server()  # later tests get a server without it


async def test_a_command_gets_none_of_the_callers_variables(canary_in_fork_server: str) -> None:
    """`env` inside shows only what the shell sets (PWD), though the caller has the variable.

    Guards against the caller's secrets (tokens, SSH_AUTH_SOCK) leaking in.
    """
    script = "env; echo ---; tr '\\0' '\\n' < /proc/1/environ"
    returncode, out = await sh(script, with_stderr=True)
    # The premise: the variable was there to leak; and the fork server, which
    # the caller started after setting it, was not given it.
    assert os.environ[CANARY] == canary_in_fork_server
    assert CANARY not in fork_server_environment()
    assert returncode == 0, out
    assert canary_in_fork_server not in out
    assert out == "PWD=/\n---\n"


async def test_a_command_gets_exactly_the_env_given(canary_in_fork_server: str) -> None:
    """With env={"A": "1"}: that variable and nothing of the caller's."""
    script = "env; echo ---; tr '\\0' '\\n' < /proc/1/environ"
    returncode, out = await sh(script, env={"A": "1"}, with_stderr=True)
    assert returncode == 0, out
    shown, _, initial = out.partition("---\n")
    assert sorted(shown.split()) == ["A=1", "PWD=/"]
    assert initial == "A=1\n"


async def test_a_callable_gets_none_of_the_callers_variables(canary_in_fork_server: str) -> None:
    """Neither os.environ nor /proc/self/environ of a callable target holds the caller's secret.

    Guards against the caller's secrets leaking in, as for commands.
    """

    def environment() -> None:
        with open("/proc/self/environ", "rb") as file:
            initial = file.read().decode(errors="replace")
        print(dict(os.environ), initial)

    returncode, out = await output_of(environment, with_stderr=True)
    assert returncode == 0, out
    assert canary_in_fork_server not in out


# --- /proc/PID/exe: the host's interpreter ----------------------------------

INTERPRETER = os.path.realpath(sys.executable)


@pytest.mark.xfail(
    strict=True,
    reason="known gap: a callable target is a fork of the fork server, never exec'd, so "
    "/proc/self/exe opens the host's interpreter even with nothing mapped",
)
async def test_a_callable_does_not_reach_the_host_interpreter() -> None:
    """With nothing mapped, /proc/self/exe of a callable container opens no host file.

    Guards against the /proc/self/exe route of CVE-2019-5736 (reading here).
    """
    host = os.stat(INTERPRETER)

    def probe() -> None:
        try:
            fd = os.open("/proc/self/exe", os.O_RDONLY)
        except OSError:
            raise SystemExit(0) from None
        found = os.fstat(fd)
        raise SystemExit(1 if (found.st_dev, found.st_ino) == (host.st_dev, host.st_ino) else 0)

    assert await ac.call_with_container(probe) == 0


async def test_the_host_interpreter_cannot_be_opened_for_writing() -> None:
    """/proc/self/exe and /proc/1/exe (also reopened from an O_PATH fd) refuse writing.

    Guards against CVE-2019-5736 (runc's binary overwritten through /proc/self/exe).
    Opening with O_WRONLY, without O_TRUNC, changes nothing if it wrongly succeeds.
    """
    before = os.stat(INTERPRETER)

    def attempt() -> None:
        opened = []
        child = os.fork()
        if child == 0:  # a second process of the container, looking at PID 1
            paths = ["/proc/self/exe", "/proc/1/exe"]
            handle = os.open("/proc/1/exe", os.O_PATH)
            paths.append(f"/proc/self/fd/{handle}")
            for path in paths:
                try:
                    os.close(os.open(path, os.O_WRONLY))
                    opened.append(path)
                except OSError:
                    pass
            os._exit(len(opened))
        _, status = os.waitpid(child, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))

    assert await ac.call_with_container(attempt) == 0
    after = os.stat(INTERPRETER)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


# --- Excursions -------------------------------------------------------------

# Waits for the excursion to write its PID, then probes it and a process of
# its own (the control) through /proc; the excursion waits for "done".
EXCURSION_PROBE = r"""
sleep 30 & control=$!
n=0
while [ ! -s /tmp/excursion ]; do sleep 0.01; n=$((n + 1)); [ $n -lt 2000 ] || exit 3; done
excursion=$(cat /tmp/excursion)
for who in control excursion; do
    eval pid=\$$who
    for what in exe environ root cwd fd/0 maps; do
        case $what in
        exe) command="head -c 4 /proc/$pid/exe" ;;
        environ|maps) command="cat /proc/$pid/$what" ;;
        fd/0) command="readlink /proc/$pid/fd/0" ;;
        *) command="ls /proc/$pid/$what/" ;;
        esac
        if $command > /dev/null 2>&1; then echo "READ $who $what"; else echo "denied $who $what"; fi
    done
done
touch /tmp/done
kill $control
wait
# Its death would take the excursion with it: wait for the excursion to end.
n=0
while [ -e /proc/$excursion ]; do sleep 0.01; n=$((n + 1)); [ $n -lt 2000 ] || exit 4; done
"""


async def test_a_container_cannot_reach_into_an_excursion() -> None:
    """An excursion's /proc/PID/exe, environ, root, cwd, fd/N and maps are closed to the container.

    Guards against CVE-2016-9962 and CVE-2019-5736: runc's process joining a
    container could be traced, or opened through /proc/PID/exe, from inside.
    """

    def excursion_waits() -> int:
        import time

        with open("/tmp/excursion.new", "w") as file:
            file.write(str(os.getpid()))
        os.rename("/tmp/excursion.new", "/tmp/excursion")
        deadline = time.monotonic() + 20
        while not os.path.exists("/tmp/done"):
            if time.monotonic() > deadline:
                raise TimeoutError("the container never probed the excursion")
            time.sleep(0.01)
        return os.getpid()

    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as reader:
        try:
            container = await ac.run_container(
                ["sh", "-c", EXCURSION_PROBE], mounts=[*SYSTEM, ac.WRITABLE_TMP], stdout=write_end
            )
        finally:
            os.close(write_end)
        async with container:
            pid = await ac.container_excursion_value(container, excursion_waits)
            data = await anyio.to_thread.run_sync(reader.read)
            assert await container.wait() == 0
    lines = data.decode().splitlines()
    assert isinstance(pid, int)
    whats = ("exe", "environ", "root", "cwd", "fd/0", "maps")
    assert lines == [f"READ control {what}" for what in whats] + [
        f"denied excursion {what}" for what in whats
    ]


@pytest.mark.parametrize("raised", [ValueError, SystemExit])
async def test_a_callable_whose_stderr_is_full_exits_cleanly(raised: type) -> None:
    """Its traceback cannot be written (ENOSPC): once it unwound into the fork server's frames.

    The process then ran the server's own error path and exited 120.
    """

    def fail() -> None:
        raise raised("a message that goes nowhere")

    with open("/dev/full", "wb") as full:
        status = await ac.call_with_container(fail, stderr=full)
    assert status == 1
    # The server is fine.
    assert await ac.call_with_container(lambda: None) == 0
