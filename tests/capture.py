"""Run a target in a container and capture what it prints (shared by the test modules)."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

import asynccontainer as ac

# For a container that makes containers of its own (root's, for a user who
# is not): the kernel lets a user namespace mount proc and sysfs only if a
# fully visible instance is mounted already (mount_too_revealing() in
# fs/namespace.c), and /proc and /sys have masked paths. These instances
# have none; they show the outer container's own pid and net namespaces.
# And the set-up inside needs openat2, which the default filter of a root
# caller's container refuses (it cannot see the mode openat2 creates with).
NESTING_SECCOMP = ac.SeccompPolicy(deny_setuid_files=False)
NESTING_MOUNTS = (
    ac.FileSystem("proc", "/run/unmasked/proc", "proc", flags={"no-suid", "no-dev", "no-exec"}),
    ac.FileSystem(
        "sysfs", "/run/unmasked/sys", "sysfs", flags={"no-suid", "no-dev", "no-exec", "read-only"}
    ),
)


async def output_of(target: Any, *, with_stderr: bool = False, **keywords: Any) -> tuple[int, str]:
    """Run `target` with `run_container(**keywords)`; return (returncode, its stdout).

    With `with_stderr`, stderr goes to the same pipe.
    """
    read_end, write_end = os.pipe()
    if with_stderr:
        keywords["stderr"] = write_end
    try:
        container = await ac.run_container(target, stdout=write_end, **keywords)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    async with container:
        with os.fdopen(read_end, "rb") as reader:
            data = await anyio.to_thread.run_sync(reader.read)
        returncode = await container.wait()
    return returncode, data.decode()


async def sh(script: str, **keywords: Any) -> tuple[int, str]:
    """Run a shell script with the host's programs mapped; return (returncode, stdout)."""
    keywords.setdefault("mounts", ac.HOST_SYSTEM_MAPPINGS)
    return await output_of(["sh", "-c", script], **keywords)


@contextlib.contextmanager
def outside_tmp_directory() -> Iterator[Path]:
    """Yield a fresh host directory in /var/tmp: outside /tmp, which the set-up covers."""
    directory = tempfile.mkdtemp(prefix="asynccontainer-test-", dir="/var/tmp")
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory)


class Marker:
    """Creates a file when unpickled: proof that a pickle from inside ran as code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.path}",))


def forge_reply(marker: str) -> None:
    """Run inside: write a frame that runs `touch marker` when the caller unpickles it."""
    payload = pickle.dumps(Marker(marker))
    frame = struct.pack(">IB", len(payload), 0) + payload
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=int(name))
        except OSError:
            continue
        try:
            sock.send(frame)
        except OSError:
            pass
        finally:
            sock.detach()
    os._exit(0)
