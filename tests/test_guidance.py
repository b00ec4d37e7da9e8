"""Errors that say what to do: an empty root, a refused clone, a PID file that never comes."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

import asynccontainer as ac


async def test_a_command_in_an_empty_root_says_how_to_map_programs() -> None:
    with pytest.raises(FileNotFoundError) as caught:
        await ac.call_with_container(["true"])
    notes = "\n".join(caught.value.__notes__)
    assert "mounts=ac.HOST_SYSTEM_MAPPINGS" in notes
    assert caught.value.filename == "true"


async def test_a_missing_command_with_programs_mapped_has_no_such_note() -> None:
    with pytest.raises(FileNotFoundError) as caught:
        await ac.call_with_container(["no-such-program"], mounts=ac.HOST_SYSTEM_MAPPINGS)
    assert not any("HOST_SYSTEM_MAPPINGS" in note for note in caught.value.__notes__)


# In a user namespace of its own, the limit is its own to set (the user.*
# sysctls are per user namespace, writable with CAP_SYS_RESOURCE there:
# user_namespaces(7)), and the kernel's refusal is real.
_REFUSED = """
import anyio, asynccontainer as ac
with open("/proc/sys/user/max_user_namespaces", "w") as limit:
    limit.write("0")

async def main():
    try:
        await ac.call_with_container(["true"], mounts=ac.HOST_SYSTEM_MAPPINGS)
    except OSError as exc:
        print(exc.errno)
        print("\\n".join(exc.__notes__))

anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_refused_clone_points_at_the_limit_and_at_check(backend: str) -> None:
    """The kernel's own ENOSPC, past user.max_user_namespaces."""
    result = subprocess.run(
        ["unshare", "-Ur", "--", sys.executable, "-c", "import sys\n" + _REFUSED, backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    number, notes = result.stdout.split("\n", 1)
    assert int(number) == errno.ENOSPC
    assert "user.max_user_namespaces" in notes and "asynccontainer check" in notes


async def test_a_pid_file_timeout_is_a_timeout_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "never.pid"
    with pytest.raises(ac.PidFileTimeoutError) as caught:
        await ac.read_pid_file(str(path), timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    assert (caught.value.path, caught.value.timeout) == (str(path), 0.2)
    assert str(path) in str(caught.value)
