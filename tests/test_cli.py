"""The `asynccontainer` command, used as a user would: the installed entry point, in subprocesses.

Exit statuses, stdio, options, a terminal session under a pty, Ctrl-C as
SIGINT, excursions into a running container, services files (with every
error on its line), `check`, and bad arguments (one line, exit 2, never a
traceback). Every process started here is waited for, and nothing it
started may outlive it.
"""

from __future__ import annotations

import errno
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from procfs import children_of

import asynccontainer as ac

# The console script installed with the package: the one next to this
# interpreter first (a virtualenv's, or nox's), else the first on PATH.
CLI = shutil.which(
    "asynccontainer",
    path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
)
TIMEOUT = 30


def cli() -> str:
    if CLI is None:
        pytest.fail(
            "the asynccontainer command is not installed for this Python: run `pip install -e .`",
            pytrace=False,
        )
    return CLI


def run_cli(
    *args: str, timeout: float = TIMEOUT, **keywords: Any
) -> subprocess.CompletedProcess[str]:
    """Run `asynccontainer ARGS...`; return its status and output (text)."""
    keywords.setdefault("stdin", subprocess.DEVNULL)
    keywords.setdefault("capture_output", True)
    return subprocess.run([cli(), *args], timeout=timeout, text=True, check=False, **keywords)


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


# -- processes ----------------------------------------------------------------------


def descendants_of(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().decode(errors="replace").split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


def identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): a process, not a PID that may be reused; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return pid, fields[19]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def find_descendant(pid: int, argv: Sequence[str], timeout: float = 15) -> int:
    """Wait for a descendant of `pid` running exactly `argv`; return its host PID."""

    def look() -> int | None:
        for child in sorted(descendants_of(pid)):
            if cmdline(child) == list(argv):
                return child
        return None

    found: int = wait_until(look, timeout, f"a process {' '.join(argv)!r} under {pid}")
    return found


def all_gone(processes: set[tuple[int, str]], timeout: float = 10) -> None:
    """Wait until none of `processes` (identities) is alive; fail naming those that are."""
    try:
        wait_until(
            lambda: not {p for p in processes if identity(p[0]) == p},
            timeout,
            "the processes to end",
        )
    except AssertionError:
        left = sorted(p[0] for p in processes if identity(p[0]) == p)
        raise AssertionError(
            "left running: " + "; ".join(f"{pid} {' '.join(cmdline(pid))}" for pid in left)
        ) from None


def snapshot(pid: int) -> set[tuple[int, str]]:
    """The identities of `pid` and of all its descendants."""
    return {i for i in map(identity, {pid, *descendants_of(pid)}) if i is not None}


@contextmanager
def background(*args: str, **keywords: Any) -> Iterator[subprocess.Popen[str]]:
    """Start `asynccontainer ARGS...`; on the way out, kill it if it still runs, and reap it."""
    keywords.setdefault("stdin", subprocess.DEVNULL)
    keywords.setdefault("stdout", subprocess.PIPE)
    keywords.setdefault("stderr", subprocess.PIPE)
    process = subprocess.Popen([cli(), *args], text=True, **keywords)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=TIMEOUT)


class Lines:
    """Read a child's text pipe line by line, each read with a deadline."""

    def __init__(self, pipe: Any) -> None:
        self.fd = pipe.fileno()
        self.buffer = b""
        self.seen: list[str] = []

    def next(self, timeout: float) -> str | None:
        """Return the next line, or None at end of file; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise AssertionError(f"no line within {timeout} s; so far: {self.seen!r}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        text = line.decode()
        self.seen.append(text)
        return text


# -- run: status and stdio ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_exits_with_the_command_status_and_passes_stdout_and_stderr(backend: str) -> None:
    result = run_cli(
        "run", "--backend", backend, "--", "sh", "-c", "echo out; echo err >&2; exit 3"
    )
    assert result.returncode == 3
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


def test_run_under_trio() -> None:
    result = run_cli("run", "--backend", "trio", "--", "sh", "-c", "exit 4")
    assert result.returncode == 4
    assert result.stderr == ""


def test_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asynccontainer", "run", "--", "sh", "-c", "echo via -m; exit 5"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (5, "via -m\n", "")


def test_stdin_passes_through() -> None:
    data = "".join(f"line {n}\n" for n in range(2000))
    result = run_cli("run", "--", "cat", input=data, stdin=None)
    assert result.returncode == 0
    assert result.stdout == data


def test_a_signal_gives_128_plus_its_number() -> None:
    result = run_cli("run", "--", "sh", "-c", "kill -TERM $$")
    assert result.returncode == 128 + signal.SIGTERM
    no_traceback(result)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_timeout_stops_the_command_with_124(backend: str) -> None:
    started = time.monotonic()
    result = run_cli("run", "--backend", backend, "--timeout", "0.5", "--", "sleep", "10")
    elapsed = time.monotonic() - started
    assert result.returncode == 124
    assert elapsed < 5
    assert "0.5" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    no_traceback(result)


def test_command_not_found_is_127() -> None:
    result = run_cli("run", "--", "no-such-command", "arg")
    assert result.returncode == 127
    assert "no-such-command" in result.stderr
    assert "command not found" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    no_traceback(result)


def test_a_file_that_is_not_executable_is_126(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho should not run\n")
    script.chmod(0o644)
    result = run_cli("run", "--expose", f"{tmp_path}=/scripts", "--", "/scripts/script")
    assert result.returncode == 126
    assert "/scripts/script" in result.stderr
    assert "Permission denied" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""
    no_traceback(result)


def test_a_file_that_is_no_program_is_126(tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_bytes(b"\x7fELF\0 but not a program")
    program.chmod(0o755)
    result = run_cli("run", "--expose", f"{tmp_path}=/x", "--", "/x/program")
    assert result.returncode == 126
    assert result.stderr.splitlines() == ["asynccontainer: /x/program: Exec format error"]
    no_traceback(result)


# -- run: options -----------------------------------------------------------------------


def test_hostname() -> None:
    result = run_cli("run", "--hostname", "box", "--", "hostname")
    assert (result.returncode, result.stdout) == (0, "box\n")


def test_uid_and_gid() -> None:
    result = run_cli("run", "--uid", "1000", "--gid", "100", "--", "sh", "-c", "id -u; id -g")
    assert (result.returncode, result.stdout) == (0, "1000\n100\n")
    result = run_cli("run", "--", "id", "-u")
    assert (result.returncode, result.stdout) == (0, "0\n")


def test_env_is_exactly_the_defaults_and_what_is_given() -> None:
    result = run_cli(
        "run",
        "--env",
        "K=V",
        "--env",
        "EMPTY=",
        "--env",
        "HOME=/tmp",
        "--",
        "env",
        env={**os.environ, "SECRET": "not for the container", "TERM": "vt100"},
    )
    assert result.returncode == 0
    variables = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert variables == {
        "PATH": variables["PATH"],
        "TERM": "vt100",
        "HOME": "/tmp",
        "K": "V",
        "EMPTY": "",
    }
    assert "/usr/bin" in variables["PATH"].split(":")


def test_expose_is_read_only(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("from the host\n")
    result = run_cli(
        "run",
        "--expose",
        f"{tmp_path}=/data",
        "--",
        "sh",
        "-c",
        "cat /data/f; echo x > /data/g",
    )
    assert result.returncode != 0
    assert result.stdout == "from the host\n"
    assert "Read-only file system" in result.stderr
    assert not (tmp_path / "g").exists()
    # Without =DST, the same path inside.
    result = run_cli("run", "--expose", str(tmp_path), "--", "cat", str(tmp_path / "f"))
    assert (result.returncode, result.stdout) == (0, "from the host\n")


def test_share_is_writable(tmp_path: Path) -> None:
    result = run_cli(
        "run", "--share", f"{tmp_path}=/data", "--", "sh", "-c", "echo written > /data/g"
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert (tmp_path / "g").read_text() == "written\n"
    result = run_cli("run", "--share", str(tmp_path), "--", "sh", "-c", f"echo 2 > {tmp_path}/h")
    assert result.returncode == 0
    assert (tmp_path / "h").read_text() == "2\n"


def test_the_fresh_root_is_read_only_unless_writable_root() -> None:
    result = run_cli("run", "--", "sh", "-c", "touch /new")
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr
    result = run_cli("run", "--writable-root", "--", "sh", "-c", "touch /new && ls /new")
    assert (result.returncode, result.stdout) == (0, "/new\n")
    # /tmp is writable in any case.
    result = run_cli("run", "--", "sh", "-c", "echo t > /tmp/t && cat /tmp/t")
    assert (result.returncode, result.stdout) == (0, "t\n")


def test_root_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "marker").write_text("my root\n")
    # The host's programs, by hand: --root adds no mapping of its own.
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            (root / link).symlink_to(os.readlink(f"/{link}"))
    script = "cat /marker; touch /new"
    result = run_cli("run", "--root", str(root), "--expose", "/usr", "--", "sh", "-c", script)
    assert result.returncode != 0
    assert result.stdout == "my root\n"
    assert "Read-only file system" in result.stderr
    assert not (root / "new").exists()
    result = run_cli(
        "run", "--root", str(root), "--writable-root", "--expose", "/usr", "--", "sh", "-c", script
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "my root\n", "")
    assert (root / "new").exists()


def test_share_net() -> None:
    ours = os.readlink("/proc/self/ns/net")
    shared = run_cli("run", "--share-net", "--", "readlink", "/proc/self/ns/net")
    assert (shared.returncode, shared.stdout) == (0, ours + "\n")
    own = run_cli("run", "--", "readlink", "/proc/self/ns/net")
    assert own.returncode == 0
    assert own.stdout.startswith("net:[")
    assert own.stdout != ours + "\n"


# -- a terminal -------------------------------------------------------------------------


# Run in the child, after setsid (start_new_session): its stdin, the pty's
# slave, becomes its controlling terminal, as a login shell's is; then it
# becomes the command (same PID).
TAKE_THE_TERMINAL = (
    "import fcntl, os, sys, termios; "
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Terminal:
    """The `asynccontainer` command on a pty of its own, typed at as a user would."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", TAKE_THE_TERMINAL, cli(), *args],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                env={**os.environ, "TERM": "xterm"},
            )
        except BaseException:
            os.close(self.master)
            raise
        finally:
            os.close(slave)
        self.output = b""

    def read_until(self, pattern: bytes, timeout: float = 15) -> None:
        """Read what the terminal shows until `pattern` (a regex) is in it."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.master], [], [], remaining)[0]:
                raise AssertionError(f"{pattern!r} not shown within {timeout} s: {self.output!r}")
            if not self._read():
                raise AssertionError(f"the terminal closed before {pattern!r}: {self.output!r}")

    def _read(self) -> bool:
        try:
            data = os.read(self.master, 65536)
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: every slave is closed
                raise
            data = b""
        self.output += data
        return bool(data)

    def raw(self) -> bool:
        """True once the command has put its terminal in raw mode (and relays keys)."""
        lflag = termios.tcgetattr(self.master)[3]
        return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 15) -> int:
        """Wait for the command to exit, showing what it prints meanwhile; return its status."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.05)[0]:
                self._read()
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=TIMEOUT)
        os.close(self.master)


@contextmanager
def terminal(*args: str) -> Iterator[Terminal]:
    term = Terminal(*args)
    try:
        yield term
    finally:
        term.close()


def test_an_interactive_shell_in_a_terminal() -> None:
    with terminal("run", "--hostname", "tty", "--", "sh") as term:
        term.read_until(rb"# $")
        assert term.raw()
        term.type(b"echo hello $((6*7)); tty; hostname\r")
        term.read_until(rb"hello 42\r\n/dev/\S+\r\ntty\r\n")  # a terminal: tty names it

        # Ctrl-C stops what runs in the foreground, not the shell.
        term.type(b"sleep 30\r")
        sleeper = find_descendant(term.process.pid, ["sleep", "30"])
        sleeping = identity(sleeper)
        assert sleeping is not None
        term.type(b"\x03")
        all_gone({sleeping}, timeout=5)
        term.type(b"echo still here\r")
        term.read_until(rb"\nstill here\r\n")

        term.type(b"exit 3\r")
        assert term.wait() == 3
        assert b"Traceback" not in term.output


def test_ctrl_c_in_a_terminal_stops_the_command_with_130() -> None:
    with terminal("run", "--", "sleep", "30") as term:
        sleeper = find_descendant(term.process.pid, ["sleep", "30"])
        processes = snapshot(term.process.pid) - {identity(term.process.pid)}
        wait_until(term.raw, 10, "the terminal in raw mode")
        term.type(b"\x03")
        assert term.wait() == 128 + signal.SIGINT
        assert identity(sleeper) is None
        all_gone(processes)
        assert b"Traceback" not in term.output


# -- Ctrl-C without a terminal ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigint_without_a_terminal_stops_the_container_with_130(backend: str) -> None:
    with background("run", "--backend", backend, "--", "sleep", "60") as process:
        sleeper = find_descendant(process.pid, ["sleep", "60"])
        processes = snapshot(process.pid) - {identity(process.pid)}
        assert identity(sleeper) in processes
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 128 + signal.SIGINT, stderr
        assert time.monotonic() - started < 10
        assert "Traceback" not in stdout + stderr
        all_gone(processes)


def test_sigterm_stops_the_container_with_143() -> None:
    with background("run", "--", "sleep", "60") as process:
        find_descendant(process.pid, ["sleep", "60"])
        processes = snapshot(process.pid) - {identity(process.pid)}
        process.terminate()
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 128 + signal.SIGTERM, stderr
        all_gone(processes)


# -- exec -------------------------------------------------------------------------------


def test_exec_into_a_running_container() -> None:
    with background("run", "--hostname", "inner", "--", "sleep", "30") as process:
        sleeper = find_descendant(process.pid, ["sleep", "30"])
        processes = snapshot(process.pid) - {identity(process.pid)}

        result = run_cli("exec", str(sleeper), "--", "hostname")
        assert (result.returncode, result.stdout, result.stderr) == (0, "inner\n", "")
        # In its pid namespace: a few PIDs from 1 up, not the host's.
        result = run_cli("exec", str(sleeper), "--", "sh", "-c", "echo $$; exit 7")
        assert result.returncode == 7
        assert 1 < int(result.stdout) < 10
        # docs/cli.md's synopsis: options after the PID, the command after '--'.
        result = run_cli(
            "exec", str(sleeper), "--env", "GREETING=hi", "--", "sh", "-c", "echo $GREETING"
        )
        assert (result.returncode, result.stdout) == (0, "hi\n"), result.stderr

        with open("/proc/sys/kernel/pid_max") as file:
            never = int(file.read())  # PIDs are below pid_max
        result = run_cli("exec", str(never), "--", "hostname")
        assert result.returncode == 1
        assert len(result.stderr.splitlines()) == 1
        assert str(never) in result.stderr
        no_traceback(result)

        process.terminate()
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 128 + signal.SIGTERM, stderr
        all_gone(processes)


# -- services ---------------------------------------------------------------------------

VALID = """\
# Two services.
[services.sleeper]
command = ["sleep", "300"]
grace_period = 1

[services.loop]
command = ["sh", "-c", "while :; do sleep 1; done"]
grace_period = 1
"""


def test_services_check_of_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(VALID)
    result = run_cli("services", "--check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "2 service" in result.stdout


def test_services_check_of_a_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "syntax.toml"
    path.write_text('[services.web]\ncommand = ["sleep", "1"]\nuser = nobody\n')
    result = run_cli("services", "--check", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}:3:")
    assert result.stdout == ""
    no_traceback(result)


SEMANTIC_ERRORS = """\
[services.good]
command = ["sleep", "1"]

[services.bad]
command = "sleep 10"
grace_period = -1
pid_file = "var/run/bad.pid"
colour = "blue"

[services.worse]
respawn = "yes"
"""


def test_services_check_reports_every_error_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "semantic.toml"
    path.write_text(SEMANTIC_ERRORS)
    result = run_cli("services", "--check", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    no_traceback(result)
    errors = result.stderr.splitlines()
    expected = {
        5: "services.bad.command",
        6: "services.bad.grace_period",
        7: "services.bad.pid_file",
        8: "services.bad.colour",
        10: "services.worse",  # no command: the table's line
        11: "services.worse.respawn",
    }
    for line, where in expected.items():
        assert any(e.startswith(f"{path}:{line}: {where}") for e in errors), (line, errors)
    assert all(e.startswith(f"{path}:") for e in errors)
    assert len(errors) == len(expected), errors
    # Each message says what is wrong.
    text = result.stderr
    assert "sequence" in text  # the command as a string
    assert "-1" in text
    assert "relative" in text
    assert "unknown field" in text


def table_rows(lines: Lines, names: set[str], timeout: float) -> dict[str, list[str]]:
    """Read status tables until one shows every service in `names` running; return its rows."""
    deadline = time.monotonic() + timeout
    rows: dict[str, list[str]] = {}
    while True:
        line = lines.next(max(0.1, deadline - time.monotonic()))
        assert line is not None, f"the output ended: {lines.seen!r}"
        fields = line.split()
        if fields == ["NAME", "PID", "STATE", "RESTARTS", "UPTIME", "STATUS"]:
            rows = {}
        elif fields and fields[0] in names:
            rows[fields[0]] = fields
            if set(rows) == names and all(r[2] == "running" for r in rows.values()):
                return rows


def test_services_run_until_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "services.toml"
    path.write_text(VALID)
    with background("services", str(path)) as process:
        rows = table_rows(Lines(process.stdout), {"sleeper", "loop"}, timeout=15)
        pids = {name: int(row[1]) for name, row in rows.items()}
        assert cmdline(pids["sleeper"]) == ["sleep", "300"]
        assert pids["sleeper"] in descendants_of(process.pid)
        processes = snapshot(process.pid) - {identity(process.pid)}
        assert {identity(pid) for pid in pids.values()} <= processes

        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "`asynccontainer services` did not end within 15 s of SIGTERM"
            ) from None
        assert process.returncode == 0, stderr
        assert "Traceback" not in stdout + stderr
        all_gone(processes)
        # The last table says how each one ended.
        last = stdout.strip().split("\n\n")[-1].splitlines()
        assert last[0].split() == ["NAME", "PID", "STATE", "RESTARTS", "UPTIME", "STATUS"]
        assert sorted(line.split()[0] for line in last[1:]) == ["loop", "sleeper"]
        assert all("running" not in line for line in last[1:]), last


NOTIFYING = """\
[services.notifier]
command = ["/usr/bin/python3", "-c", '''
import os, socket, time
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(b"READY=1\\nSTATUS=serving 3 clients", os.environ["NOTIFY_SOCKET"])
time.sleep(300)
''']
notify = true
grace_period = 1
"""


def test_the_services_table_shows_the_notify_status(tmp_path: Path) -> None:
    path = tmp_path / "services.toml"
    path.write_text(NOTIFYING)
    with background("services", str(path)) as process:
        rows = table_rows(Lines(process.stdout), {"notifier"}, timeout=15)
        assert rows["notifier"][5:] == ["serving", "3", "clients"]
        assert cmdline(int(rows["notifier"][1]))[0] == "/usr/bin/python3"
        process.terminate()
        process.communicate(timeout=15)
        assert process.returncode == 0


def test_a_services_file_with_sockets_serves_connections(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "services.toml"
    path.write_text(
        "[services.echo]\n"
        'command = ["sh", "-c", "read line; echo echo: $line"]\n'
        f'sockets = ["127.0.0.1:{port}"]\n'
        "accept = true\n"
    )
    with background("services", str(path)) as process:
        deadline = time.monotonic() + 15
        while True:
            try:
                connection = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                assert time.monotonic() < deadline, "the services never listened"
                time.sleep(0.05)
        with connection:
            connection.sendall(b"hello\n")
            assert connection.makefile().readline() == "echo: hello\n"
        process.terminate()
        process.communicate(timeout=15)
        assert process.returncode == 0


def test_the_services_files_of_the_sockets_guide_pass_check(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "howto" / "sockets.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", page, re.DOTALL)
    assert blocks
    for number, block in enumerate(blocks):
        path = tmp_path / f"guide{number}.toml"
        path.write_text(block)
        result = run_cli("services", "--check", str(path))
        assert result.returncode == 0, result.stderr


def test_services_a_failed_dependency_fails_what_requires_it(tmp_path: Path) -> None:
    mark = tmp_path / "web-started"
    path = tmp_path / "services.toml"
    path.write_text(
        '[services.web]\ncommand = ["touch", "' + str(mark) + '"]\nrequires = ["db"]\n'
        '[services.db]\ncommand = ["no-such-database"]\n'
    )
    result = run_cli("services", str(path))
    assert result.returncode == 1
    assert re.search(r"\nweb: requires 'db', which failed to start", result.stdout)
    assert not mark.exists()
    no_traceback(result)


def test_services_check_of_a_cycle(tmp_path: Path) -> None:
    path = tmp_path / "cycle.toml"
    path.write_text(
        '[services.a]\ncommand = ["true"]\nrequires = ["b"]\n'
        '[services.b]\ncommand = ["true"]\nrequires = ["a"]\n'
    )
    result = run_cli("services", "--check", str(path))
    assert result.returncode == 1
    assert "cycle" in result.stderr and len(result.stderr.splitlines()) == 1


def test_services_check_of_bad_sockets(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[services.web]\ncommand = ["cat"]\naccept = true\nsockets = ["localhost:80"]\n'
    )
    result = run_cli("services", "--check", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:4: services.web.sockets: ")
    assert "numeric address" in result.stderr


def test_services_without_log_file_print_their_lines_on_stderr(tmp_path: Path) -> None:
    path = tmp_path / "services.toml"
    path.write_text(
        '[services.talker]\ncommand = ["sh", "-c", "echo hello-from-talker; exec sleep 300"]\n'
    )
    with background("services", str(path)) as process:
        lines = Lines(process.stderr)
        line = lines.next(timeout=15)
        while line is not None and "hello-from-talker" not in line:
            line = lines.next(timeout=15)
        assert line is not None and "asynccontainer.service.talker" in line
        process.terminate()
        process.communicate(timeout=15)
        assert process.returncode == 0


def test_services_of_a_missing_file() -> None:
    # A path argument that does not exist is a usage error, as for --expose.
    result = run_cli("services", "/nonexistent.toml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "asynccontainer: error: argument FILE.toml: /nonexistent.toml: no such file or directory"
    ]
    assert result.stdout == ""


# -- check --------------------------------------------------------------------------------


def test_check() -> None:
    result = run_cli("check")
    assert result.returncode == 0, result.stdout
    for name in ac.NAMESPACES:
        assert re.search(rf"^ok\s+{name} namespace", result.stdout, re.MULTILINE), name
    assert "pidfd" in result.stdout
    assert "unprivileged user namespaces" in result.stdout
    assert "setgroups" in result.stdout
    assert "cgroup" in result.stdout
    assert re.search(r"^ok\s+mounts by file descriptor", result.stdout, re.MULTILINE)
    # The suite runs under both executors (noxfile.py): check names the one in use.
    expected = "Python" if os.environ.get("ASYNCCONTAINER_EXECUTOR") == "python" else "C"
    assert re.search(rf"^ok\s+executor\s+{expected} \(", result.stdout, re.MULTILINE)


def test_check_reports_a_missing_system_call(tmp_path: Path) -> None:
    """Under a filter that refuses openat2 (ENOSYS), check names it and says what to do."""
    program = (
        "import sys, anyio, asynccontainer as ac; "
        "from asynccontainer._cli.check import report; "
        "policy = ac.SeccompPolicy(deny=ac.DEFAULT_SECCOMP.deny | {'openat2'}, errno=38); "
        "sys.exit(anyio.run(lambda: ac.call_with_container("
        "lambda: sys.exit(report(sys.stdout)), seccomp=policy, stdin=None)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^MISSING\s+mounts by file descriptor.*missing: openat2", result.stdout, re.M)
    assert "needs Linux 5.12 or later" in result.stdout


# -- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["run"],
        ["run", "--"],
        ["run", "--uid", "x", "--", "true"],
        ["run", "--gid", "-3", "--", "true"],
        ["run", "--expose", "/nonexistent", "--", "true"],
        ["run", "--share", "/nonexistent=/x", "--", "true"],
        ["run", "--env", "NOEQUALS", "--", "true"],
        ["run", "--timeout", "-1", "--", "true"],
        ["run", "--timeout", "soon", "--", "true"],
        ["run", "--backend", "curio", "--", "true"],
        ["run", "--no-such-option", "--", "true"],
        ["exec", "notapid", "--", "true"],
        ["exec", "0", "--", "true"],
        ["exec", "1"],
        ["services"],
    ],
    ids=lambda args: " ".join(args) or "nothing",
)
def test_bad_arguments_get_one_line_and_status_2(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("asynccontainer: error: ")
    assert result.stdout == ""
    no_traceback(result)


def test_help_is_not_an_error() -> None:
    result = run_cli("run", "--help")
    assert result.returncode == 0
    for option in ("--share-net", "--expose", "--share", "--root", "--writable-root", "--timeout"):
        assert option in result.stdout


def test_version_is_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"asynccontainer {ac.__version__}\n"


@pytest.mark.parametrize("pid", ["99999999999999999999", "0", "-3", "12ab"])
def test_exec_with_an_impossible_pid_is_a_usage_error(pid: str) -> None:
    result = run_cli("exec", pid, "--", "true")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "a PID" in result.stderr
    no_traceback(result)


def test_a_command_word_before_the_separator_is_a_usage_error() -> None:
    result = run_cli("run", "--hostname", "box", "sh", "--", "-c", "true")
    assert result.returncode == 2
    assert "'sh' before '--'" in result.stderr
    no_traceback(result)


# -- a terminal only when there is one to relay, and the new run options ------------------


def run_on_a_terminal_stdin(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `asynccontainer ARGS...` with a pty as stdin, stdout and stderr piped (`| od -c`)."""
    master, slave = os.openpty()
    try:
        return subprocess.run(
            [cli(), *args],
            stdin=slave,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        os.close(slave)
        os.close(master)


IS_STDOUT_A_TERMINAL = "if [ -t 1 ]; then echo terminal; else echo plain; fi"


def test_piped_output_gets_plain_bytes_and_stderr_apart() -> None:
    script = f"{IS_STDOUT_A_TERMINAL}; printf 'a\\nb\\n'; echo to-stderr >&2"
    result = run_on_a_terminal_stdin("run", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "plain\na\nb\n"  # no pty: no \r\n, no echo
    assert result.stderr == "to-stderr\n"


def test_a_tty_when_asked() -> None:
    result = run_on_a_terminal_stdin("run", "-t", "--", "sh", "-c", IS_STDOUT_A_TERMINAL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["terminal"]


def test_a_tty_asked_without_a_terminal_is_a_usage_error() -> None:
    result = run_cli("run", "--tty", "--", "true")
    assert result.returncode == 2
    assert result.stderr == "asynccontainer: error: --tty needs a terminal on stdin to relay\n"


def test_sigterm_is_forwarded_and_the_command_may_exit_on_its_own() -> None:
    script = "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    with background("run", "--", "sh", "-c", script) as process:
        lines = Lines(process.stdout)
        assert lines.next(TIMEOUT) == "ready"
        processes = snapshot(process.pid) - {identity(process.pid)}
        process.terminate()
        assert lines.next(TIMEOUT) == "got TERM"  # its handler ran: it was not SIGKILLed
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 128 + signal.SIGTERM, stderr
        all_gone(processes)


def test_a_command_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 0.1; done"
    with background("run", "--grace", "0.5", "--", "sh", "-c", script) as process:
        lines = Lines(process.stdout)
        assert lines.next(TIMEOUT) == "ready"
        processes = snapshot(process.pid) - {identity(process.pid)}
        process.terminate()
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 128 + signal.SIGTERM, stderr
        all_gone(processes)


def test_run_cwd_tmpfs_and_limit() -> None:
    script = "pwd; echo x > /scratch/file && cat /scratch/file"
    result = run_cli(
        "run", "--cwd", "/tmp", "--tmpfs", "/scratch", "--limit", "memory=64M",
        "--limit", "pids=32", "--", "sh", "-c", script,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, "/tmp\nx\n"), result.stderr


@pytest.mark.parametrize(
    ("option", "text"),
    [("bogus=1", "bogus"), ("memory", "KEY=VALUE"), ("pids=-4", "pids")],
)
def test_a_bad_limit_is_one_line(option: str, text: str) -> None:
    result = run_cli("run", "--limit", option, "--", "true")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and text in result.stderr
    no_traceback(result)


def test_run_network_veth() -> None:
    """The container's end of the pair is up, beside lo (it needs root: the suite is)."""
    result = run_cli("run", "--network", "veth", "--", "cat", "/proc/net/route")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2  # a default route through the host's end


@pytest.mark.parametrize(
    ("line", "text"),
    [
        ("namespaces = 3", "namespaces must be an iterable of names such as ('mnt', 'pid'), not 3"),
        ("mounts = []", "unknown field; did you mean 'mappings'?"),
        ("grace_period = 'soon'", "grace_period must be a number of seconds, not 'soon'"),
    ],
)
def test_a_wrong_type_in_the_services_file_is_one_line(
    tmp_path: Path, line: str, text: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[services.a]\ncommand = ["sleep", "1"]\n{line}\n')
    result = run_cli("services", "--check", str(path))
    assert result.returncode == 1
    [message] = result.stderr.splitlines()
    assert message.startswith(f"{path}:3: services.a.") and text in message
    no_traceback(result)


def test_services_on_a_terminal(tmp_path: Path) -> None:
    """File order, a failure's reason under the table, log lines above it, Ctrl-C as SIGTERM."""
    signals = tmp_path / "signals"
    script = tmp_path / "stopper.sh"
    script.write_text(
        f"trap 'echo INT >> {signals}' INT\n"
        f"trap 'echo TERM >> {signals}; exit 0' TERM\n"
        "while :; do sleep 0.1; done\n"
    )
    path = tmp_path / "services.toml"
    path.write_text(
        "[services.talker]\n"
        'command = ["sh", "-c", "echo hello-from-talker; exec sleep 300"]\n'
        "[services.broken]\n"
        'command = ["no-such-program"]\n'
        "[services.stopper]\n"
        f'command = ["sh", "{script}"]\n'
        f'mappings = ["{tmp_path}:rw"]\n'
    )
    with terminal("services", str(path)) as term:
        term.read_until(rb"stopper +\d+ +running")
        term.read_until(rb"hello-from-talker")
        screen = term.output.decode(errors="replace")
        # The log line is a line of its own above a table, not inside one.
        assert re.search(
            r"(^|\n|\x1b\[J)[^\n]*asynccontainer\.service\.talker: hello-from-talker", screen
        )
        last_table = screen.rsplit("NAME", 1)[1]
        names = re.findall(r"\n(talker|broken|stopper) ", last_table)
        assert names == ["talker", "broken", "stopper"]  # the file's order
        assert re.search(r"\nbroken +- +failed +0 +-", last_table)
        assert re.search(r"\nbroken: [^\n]*no-such-program", last_table)  # the reason, below
        term.type(b"\x03")
        term.wait()
        assert b"Traceback" not in term.output
    # Ctrl-C reached the command, which stopped them with their stop signal;
    # the services (a session of their own) never saw the terminal's SIGINT.
    assert signals.read_text() == "TERM\n"


def test_the_services_file_table_in_the_docs_names_every_field() -> None:
    """docs/cli.md's table of keys keeps up with ServiceSpec: every field is there."""
    import attrs

    page = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    missing = [f.name for f in attrs.fields(ac.ServiceSpec) if f"`{f.name}`" not in page]
    assert missing == []


def test_the_check_output_in_the_docs_is_what_check_prints() -> None:
    """docs/cli.md shows every line `check` prints (values differ from machine to machine)."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    block = page.split("$ asynccontainer check\n", 1)[1].split("```", 1)[0]

    def labels(text: str) -> list[str]:
        found = re.findall(r"^(?:ok|MISSING|missing) +(.+?)(?:\s{2,}.*)?$", text, re.MULTILINE)
        return [label.strip() for label in found]

    result = run_cli("check")
    assert labels(block) == labels(result.stdout)
