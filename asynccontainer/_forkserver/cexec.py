"""The C executor, loaded into the fork server with ctypes (see cexecutor.c).

`spawn` clones a container child that shares the server's memory
(CLONE_VM) on a mapping of its own, and runs a plan in C: no copy of the
server's 20 MB image, no interpreter in the child. The mapping is the
server's to free once the child has exec'd or exited, which its lifetime
pipe's end-of-file says.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["CExecutor", "load"]

# The shared library the build hook (hatch_build.py) compiles next to this file.
LIBRARY = os.path.join(os.path.dirname(__file__), "_cexecutor.so")
# The init program of containers with one (acinit.c), built beside it.
INIT = os.path.join(os.path.dirname(__file__), "_acinit")


class CExecutor:
    """The loaded library."""

    def __init__(self, library: ctypes.CDLL, init: int) -> None:
        # Opened once (O_PATH, close-on-exec), before any container: each
        # child execs its init from this fd, after its root has changed.
        self.init = init
        self._spawn = library.ac_spawn
        self._spawn.restype = ctypes.c_long
        self._spawn.argtypes = [
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self._map = library.ac_map
        self._map.restype = ctypes.c_long
        self._map.argtypes = []
        self._unmap = library.ac_unmap
        self._unmap.restype = None
        self._unmap.argtypes = [ctypes.c_long]

    def map(self) -> int:
        """Map a child's plan room and stack, between guard pages; return its address.

        Raises:
            OSError: as mmap(2) fails (ENOMEM).
        """
        address = int(self._map())
        if -4096 < address < 0:
            raise OSError(-address, f"mmap: {os.strerror(-address)}")
        return address

    def unmap(self, address: int) -> None:
        """Free a mapping of `map` (its child exec'd or exited)."""
        self._unmap(address)

    def spawn(self, flags: int, cgroup: int, go: int, lifetime: int, address: int) -> int:
        """Clone a child on the mapping at `address`; return its PID.

        Raises:
            OSError: as clone3(2) fails (EPERM, ENOSPC, EINVAL ...).
        """
        pid = int(self._spawn(flags, cgroup, go, lifetime, self.init, address))
        if pid < 0:
            # As _kernel.clone words it.
            raise OSError(-pid, f"clone: {os.strerror(-pid)}")
        return pid


def load() -> CExecutor | None:
    """Return the C executor, or None where it was not built (no compiler at install)."""
    try:
        library = ctypes.CDLL(LIBRARY)
    except OSError:
        return None
    try:
        init = os.open(INIT, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        init = -1  # plans with an init are not sent here (`_plan.encode`)
    return CExecutor(library, init)
