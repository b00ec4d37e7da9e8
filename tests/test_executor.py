"""Steps of the executor run on their own, where they need no container around them."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from asynccontainer import _kernel
from asynccontainer._forkserver.mounts import open_path
from asynccontainer._forkserver.state import State
from asynccontainer._plan import steps


@pytest.fixture
def state() -> Iterator[State]:
    left, right = socket.socketpair()
    right.close()
    result = State(left, [])
    yield result
    for fd in result.slots.values():
        os.close(fd)
    left.close()


def test_a_proc_written_through_must_be_a_procfs(state: State, tmp_path: Path) -> None:
    """A directory dressed as /proc (runc's CVE-2019-16884) is refused before any write."""
    fake = tmp_path / "proc"
    (fake / "self").mkdir(parents=True)
    with pytest.raises(OSError) as info:
        open_path(state, steps.OpenPath(1, str(fake), magic=_kernel.PROC_SUPER_MAGIC))
    assert info.value.errno == errno.EINVAL and info.value.filename == str(fake)
    assert 1 not in state.slots
    open_path(state, steps.OpenPath(2, "/proc", magic=_kernel.PROC_SUPER_MAGIC))
    assert 2 in state.slots
