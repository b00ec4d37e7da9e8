"""The library's own exception classes."""

from __future__ import annotations

__all__ = [
    "ContainerError",
    "OutputLimitError",
    "PidFileTimeoutError",
    "ServiceStartError",
    "UntrustedValueError",
]


class ContainerError(Exception):
    """A failure with no better built-in class, such as the fork server dying.

    The message says what happened and what to do about it. Failures inside
    a container's set-up are not wrapped in it: they are re-raised with their
    own class (an `OSError` keeps its errno and file name).
    """


class UntrustedValueError(ContainerError):
    """What came back from inside a container is not plain data, and was not decoded.

    Values and exceptions from a process in a container's namespaces are
    read as data: None, bool, int, float, complex, str, bytes, bytearray,
    tuple, list, dict, set, frozenset, and exceptions of classes this
    process has already imported. A container can forge what comes back,
    and unpickling anything else would let it run code here. Pass
    `trusted=True` where offered to unpickle fully, knowing that.
    """


class OutputLimitError(ContainerError):
    """`run_process` read more than `max_output` bytes from one stream; the container was killed.

    Attributes:
        stdout: what was read from stdout (at most `max_output` bytes), or None.
        stderr: what was read from stderr, or None.
        max_output: the limit that was passed.
    """

    def __init__(self, message: str, stdout: bytes | None, stderr: bytes | None, max_output: int):
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr
        self.max_output = max_output


class PidFileTimeoutError(TimeoutError):
    """A PID file named no live process in time (`read_pid_file`, a service's `pid_file`).

    A `TimeoutError`, so ``except TimeoutError`` catches it; its message
    names the file, the container and why the last read did not do.

    Attributes:
        path: the PID file's path, as given (inside the container, if one).
        timeout: the seconds waited.
    """

    def __init__(self, message: str, path: str, timeout: float) -> None:
        super().__init__(message)
        self.path = path
        self.timeout = timeout


class ServiceStartError(ContainerError):
    """A service's processes all ended before it counted as started.

    Raised by `ServiceGroup.start` (or a respawn's start) at once, not at
    the start timeout. Its message ends with the service's last line of
    output: a daemon with a bad configuration usually says why there.

    Attributes:
        name: the service's name.
        returncode: its exit status (-N for signal N).
        log: its last lines of output (10 at most), oldest first.
    """

    def __init__(self, name: str, returncode: int, log: list[str], when: str) -> None:
        last = f"; its last line: {log[-1]}" if log else "; it printed nothing"
        super().__init__(f"service {name!r} exited with status {returncode} {when}{last}")
        self.name = name
        self.returncode = returncode
        self.log = log
