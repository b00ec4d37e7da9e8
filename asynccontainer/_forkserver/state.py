"""What a container process's executor holds between the steps of its plan."""

from __future__ import annotations

import socket

__all__ = ["State"]


class State:
    """The handshake, the fds received with the plan, and what steps leave for later ones.

    `slots` hold fds (copied trees, host paths opened early) and `objects`
    unpickled callables, by the numbers the plan gave them; `root` is the
    new root's fd until pivot_root; `kept` the capability mask the bounding
    set kept, for the last capability step.
    """

    def __init__(self, handshake: socket.socket, received: list[int]) -> None:
        self.handshake = handshake
        self.received = received
        self.slots: dict[int, int] = {}
        self.objects: dict[int, object] = {}
        self.root = -1
        self.kept: int | None = None
