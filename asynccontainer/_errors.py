"""The library's own exception class."""

from __future__ import annotations

__all__ = ["ContainerError"]


class ContainerError(Exception):
    """A failure with no better built-in class, such as the fork server dying.

    The message says what happened and what to do about it. Failures inside
    a container's set-up are not wrapped in it: they are re-raised with their
    own class (an `OSError` keeps its errno and file name).
    """
