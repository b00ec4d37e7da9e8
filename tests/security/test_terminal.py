"""A container cannot push keystrokes into the caller's terminal.

Guards against TIOCSTI injection, the class of CVE-2016-7545 (SELinux
policycoreutils sandbox), CVE-2017-5226 (bubblewrap: a sandboxed program
typed commands into the invoking shell) and CVE-2019-10063 (Flatpak): a
process that shares the caller's terminal and session can make the shell
read, and run, what it likes once the container ends.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

# The "caller": a session leader whose controlling terminal is the pty, as
# a shell's is, runs a container that shares that terminal (stdin=None)
# and tries TIOCSTI on it; then reads what the terminal would give the
# shell next.
CALLER = textwrap.dedent(
    """
    import os, sys, termios, anyio
    import asynccontainer as ac

    fd = os.open(sys.argv[1], os.O_RDWR)  # no O_NOCTTY: it becomes ours
    os.dup2(fd, 0)
    os.close(fd)
    INJECT = (
        "import fcntl, termios\\n"
        "try:\\n"
        "    fcntl.ioctl(0, termios.TIOCSTI, b'X')\\n"
        "    print('ioctl ok')\\n"
        "except OSError as exc:\\n"
        "    print('ioctl', exc.errno)\\n"
    )

    async def main():
        code = await ac.call_with_container(
            ["python3", "-c", INJECT],
            mounts=ac.HOST_SYSTEM_MAPPINGS,
            new_session=sys.argv[2] == "1",
        )
        assert code == 0, code

    anyio.run(main, backend=sys.argv[3])
    attributes = termios.tcgetattr(0)
    attributes[3] &= ~(termios.ICANON | termios.ECHO)
    attributes[6][termios.VMIN] = 0
    attributes[6][termios.VTIME] = 0
    termios.tcsetattr(0, termios.TCSANOW, attributes)
    print("queued", repr(os.read(0, 16)), flush=True)
    """
)


def run_caller(new_session: bool, backend: str) -> list[str]:
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        os.close(slave)
        slave = -1
        result = subprocess.run(
            [sys.executable, "-c", CALLER, path, "1" if new_session else "0", backend],
            stdin=subprocess.DEVNULL,
            check=False,
            capture_output=True,
            text=True,
            start_new_session=True,
            timeout=30,
        )
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


@BACKENDS
def test_tiocsti_into_the_callers_terminal_fails(backend: str) -> None:
    """With the defaults (a session of its own) TIOCSTI fails with EPERM and nothing is queued."""
    assert run_caller(True, backend) == [f"ioctl {errno.EPERM}", "queued b''"]


@BACKENDS
def test_control_in_the_callers_session_the_injection_works(backend: str) -> None:
    """The control: from the caller's session the same ioctl queues the byte."""
    assert run_caller(False, backend) == ["ioctl ok", "queued b'X'"]
