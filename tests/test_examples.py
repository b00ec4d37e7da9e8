"""Each example in examples/, run as a user would run it, with its output checked."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_cli import (
    Lines,
    all_gone,
    background,
    cli,
    cmdline,
    find_descendant,
    identity,
    snapshot,
    table_rows,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 60


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


# -- untrusted_snippets.py ------------------------------------------------------------


def test_untrusted_snippets_demo() -> None:
    started = time.monotonic()
    result = run_example("untrusted_snippets.py", "--demo")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # Seven snippets, run at once, the slowest killed after 2 s.
    assert time.monotonic() - started < 30
    lines = result.stdout.splitlines()
    assert lines[0].startswith("server at http://127.0.0.1:")
    answers: dict[str, dict[str, Any]] = {}
    for title, answer in zip(lines[1::2], lines[2::2], strict=True):
        assert title.startswith("--- ")
        answers[title[4:].split(" (")[0]] = json.loads(answer)

    printed = answers["a snippet that prints"]
    assert printed == {
        "status": 0,
        "stdout": "hello from sandbox, uid 0, pid 1\n",
        "timed_out": False,
        "truncated": False,
    }
    assert answers["Python counting"]["stdout"] == "45\n"
    looping = answers["a snippet that loops forever"]
    assert looping["timed_out"] is True
    assert looping["status"] == -signal.SIGKILL
    root = answers["writing to /"]
    assert root["status"] != 0
    assert root["stdout"].count("Read-only file system") == 2
    network = answers["reaching the network"]
    assert network["stdout"].startswith("no network:")
    assert "unreachable" in network["stdout"]
    endless = answers["printing without end"]
    assert endless["truncated"] is True
    assert endless["timed_out"] is False
    assert "(65536 characters)" in endless["stdout"]
    assert answers["writing to /tmp"]["stdout"] == "scratch\n"


def _post(url: str, body: bytes, timeout: float = 20) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, data=body, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def test_untrusted_snippets_server() -> None:
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "untrusted_snippets.py"), "--port", "0", "--timeout", "1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pending: list[threading.Thread] = []
    try:
        first = Lines(process.stdout).next(timeout=20)
        assert first is not None
        found = re.match(r"listening on (http://127\.0\.0\.1:\d+)/", first)
        assert found, first
        url = found.group(1)

        status, body = _post(f"{url}/run", b"echo $((6*7)) from $(hostname)")
        assert status == 200
        assert json.loads(body) == {
            "status": 0,
            "stdout": "42 from sandbox\n",
            "timed_out": False,
            "truncated": False,
        }
        status, body = _post(
            f"{url}/run?lang=python", b"import os; print(os.getuid(), os.getpid())"
        )
        assert (status, json.loads(body)["stdout"]) == (200, "0 1\n")
        started = time.monotonic()
        status, body = _post(f"{url}/run?lang=python", b"while True: pass")
        assert status == 200
        assert json.loads(body)["timed_out"] is True
        assert time.monotonic() - started < 10
        assert _post(f"{url}/run?lang=cobol", b"")[0] == 400
        assert _post(f"{url}/elsewhere", b"")[0] == 404
        with urllib.request.urlopen(f"{url}/", timeout=20) as response:
            assert b"POST a snippet to /run" in response.read()

        # A request under way when the server is stopped: its container is
        # killed and reaped, and the server exits 0.
        answers: list[object] = []

        def ask() -> None:
            try:
                answers.append(_post(f"{url}/run", b"sleep 50; echo too late"))
            except OSError as exc:  # the server closed the connection without answering
                answers.append(exc)

        request = threading.Thread(target=ask)
        request.start()
        pending.append(request)
        find_descendant(process.pid, ["sleep", "50"])
        processes = snapshot(process.pid) - {identity(process.pid)}
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stdout + stderr
        all_gone(processes)
        request.join(timeout=20)
        assert len(answers) == 1
        assert isinstance(answers[0], OSError), answers
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=TIMEOUT)
        for thread in pending:
            thread.join(timeout=TIMEOUT)


# -- supervise.py ---------------------------------------------------------------------


def test_supervise() -> None:
    result = run_example("supervise.py", "--seconds", "3.5")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^web serves http://127\.0\.0\.1:\d+/: GET / -> HTTP/1\.0 200 OK$", out, re.M)
    rounds = out.split("--- after ")[1:]
    assert len(rounds) >= 3
    for round_ in rounds:
        for name in ("web", "daemon", "flaky"):
            assert re.search(rf"^{name} +\S", round_, re.M), round_
    # The web server and the daemon ran all along, each under one PID.
    pids: dict[str, set[int]] = {"web": set(), "daemon": set(), "flaky": set()}
    for name, pid in re.findall(r"^(\w+) +running +pid (\d+)", out, re.M):
        pids[name].add(int(pid))
    assert len(pids["web"]) == 1
    assert len(pids["daemon"]) == 1
    # The flaky one (exit 3 after 1.5 s) was respawned.
    restarts = [int(n) for n in re.findall(r"^flaky .* restarts (\d+)$", out, re.M)]
    assert max(restarts) >= 1
    assert "exited with status 3; respawning" in result.stderr
    # Left the group: everything stopped, and nothing outlives the program.
    for name in ("web", "daemon", "flaky"):
        assert re.search(rf"^{name} +ended with status -?\d+$", out, re.M), name
    assert re.search(r'"GET / HTTP/1\.0" 200', out)
    for pid in set().union(*pids.values()):
        assert identity(pid) is None, pid


# -- services.toml --------------------------------------------------------------------


def test_services_toml_checks() -> None:
    result = subprocess.run(
        [cli(), "services", "--check", str(EXAMPLES / "services.toml")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "3 service(s), no errors" in result.stdout


def test_services_toml_runs_until_sigterm() -> None:
    with background("services", str(EXAMPLES / "services.toml")) as process:
        rows = table_rows(Lines(process.stdout), {"web", "daemon", "ticker"}, timeout=20)
        pids = {name: int(row[1]) for name, row in rows.items()}
        # The daemon is the process its PID file names, not the shell that forked it.
        assert cmdline(pids["daemon"]) == ["sleep", "3600"]
        assert cmdline(pids["web"])[:4] == ["python3", "-u", "-m", "http.server"]
        processes = snapshot(process.pid) - {identity(process.pid)}
        # (The ticker comes and goes: only the other two are sure to be there still.)
        assert {identity(pids["web"]), identity(pids["daemon"])} <= processes

        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("`asynccontainer services` did not end within 20 s of SIGTERM")
        assert process.returncode == 0, stderr
        assert "Traceback" not in stdout + stderr
        all_gone(processes)
