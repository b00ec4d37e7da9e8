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
    # Through libc, so that the request's upper 32 bits can be set too
    # (CVE-2019-10063: a filter comparing all 64 bits let them through).
    INJECT = (
        "import ctypes, os, sys, termios\\n"
        "libc = ctypes.CDLL(None, use_errno=True)\\n"
        "request = termios.TIOCSTI | (int(sys.argv[1]) << 32)\\n"
        "byte = ctypes.c_char(b'X')\\n"
        "if libc.ioctl(0, ctypes.c_ulong(request), ctypes.byref(byte)) == 0:\\n"
        "    print('ioctl ok')\\n"
        "else:\\n"
        "    print('ioctl', ctypes.get_errno())\\n"
    )

    async def main():
        seccomp = ac.DEFAULT_SECCOMP
        if sys.argv[4] == "unfiltered":
            seccomp = ac.SeccompPolicy(deny_ioctls=frozenset())
        code = await ac.call_with_container(
            ["python3", "-c", INJECT, sys.argv[5]],
            mounts=ac.HOST_SYSTEM_MAPPINGS,
            new_session=sys.argv[2] == "1",
            seccomp=seccomp,
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


def run_caller(
    new_session: bool, backend: str, *, filtered: bool = True, high_bits: int = 0
) -> list[str]:
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        os.close(slave)
        slave = -1
        result = subprocess.run(
            [
                *(sys.executable, "-c", CALLER, path, "1" if new_session else "0", backend),
                "filtered" if filtered else "unfiltered",
                str(high_bits),
            ],
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
@pytest.mark.parametrize("high_bits", [0, 1], ids=["request", "request-with-upper-bits"])
def test_the_filter_refuses_tiocsti_even_from_the_callers_session(
    backend: str, high_bits: int
) -> None:
    """Defence in depth: new_session=False, and the default seccomp filter still says EPERM.

    The request is compared on its low 32 bits (the kernel's own width),
    so setting the upper ones does not get past (CVE-2019-10063).
    """
    result = run_caller(False, backend, high_bits=high_bits)
    assert result == [f"ioctl {errno.EPERM}", "queued b''"]


@BACKENDS
def test_control_in_the_callers_session_the_injection_works(backend: str) -> None:
    """The control: from the caller's session, without the ioctl rule, the ioctl queues the byte."""
    assert run_caller(False, backend, filtered=False) == ["ioctl ok", "queued b'X'"]
