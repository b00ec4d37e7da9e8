"""The README's programs run as written, each in a fresh interpreter, as a reader pastes them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
# Each takes a few seconds; the margin is for a loaded machine.
TIMEOUT = 60


def run_program(code: str, *, hide_trio: bool = False) -> subprocess.CompletedProcess[str]:
    prelude = "import sys; sys.modules['trio'] = None\n" if hide_trio else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=ROOT,
    )


def test_every_python_block_is_a_whole_program() -> None:
    """No top-level `await` or `async with`: pasted as it is, each one runs."""
    assert len(BLOCKS) == 3
    for block in BLOCKS:
        compile(block, "README.md", "exec")  # a SyntaxError outside an async def
        assert "anyio.run(" in block


def test_first_example_runs() -> None:
    result = run_program(BLOCKS[0])
    assert result.returncode == 0, result.stderr
    assert re.search(r"hello from box, I am uid 0 and PID 1", result.stdout)


def test_excursion_and_pid_file_example() -> None:
    result = run_program(BLOCKS[1])
    assert result.returncode == 0, result.stderr
    assert re.search(r"PID COMMAND", result.stdout)
    assert re.search(r"daemon \d+, up [\d.]+ s", result.stdout)


def test_service_group_example(tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    result = run_program(BLOCKS[2].replace("/tmp/web.log", str(log)).replace("8000", "18731"))
    assert result.returncode == 0, result.stderr
    pid, running = result.stdout.splitlines()[0].split()
    assert int(pid) > 0 and running == "True"
    assert "stopped:" in result.stdout  # stopped when the block was left
    assert "Serving HTTP" in log.read_text()


@pytest.mark.parametrize("trio", ["with trio", "without trio"])
def test_the_first_command_runs_hello_with_or_without_trio(trio: str) -> None:
    """`pip install .` brings no trio: examples/hello.py must run without it."""
    hide = trio == "without trio"
    code = "import runpy; runpy.run_path('examples/hello.py', run_name='__main__')"
    result = run_program(code, hide_trio=hide)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("the container exited with status 0") == (1 if hide else 2)
    assert ("trio is not installed" in result.stdout) == hide
    assert os.path.exists(ROOT / "examples" / "hello.py")


@pytest.mark.timeout(600)
def test_the_readme_install_command_in_a_fresh_venv(tmp_path: Path) -> None:
    """`pip install . && python examples/hello.py`, as typed by a new user: no trio, no tools."""
    command = re.search(r"^pip install \. && python examples/hello\.py$", README, re.MULTILINE)
    assert command is not None, "the README's first command changed: change this test too"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    result = subprocess.run(
        [str(python), "examples/hello.py"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=ROOT,
        env={"PATH": os.environ["PATH"]},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the container exited with status 0" in result.stdout
    assert "trio is not installed" in result.stdout  # pip install . brings no trio
