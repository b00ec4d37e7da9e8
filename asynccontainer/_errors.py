"""The library's own exception classes."""

from __future__ import annotations

__all__ = ["ContainerError", "UntrustedValueError"]


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
