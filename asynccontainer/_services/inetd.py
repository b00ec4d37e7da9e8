"""A container per connection: Shepherd's make-inetd-constructor, systemd's Accept=yes.

The caller accepts on the listening sockets (non-blocking, as only it
accepts) and starts the service's container with the connection as its
stdin and stdout, its stderr the service's log. At most `max_connections`
run at once: the caller accepts no more until one ends, so further
connections wait in the kernel's backlog, as they would for a busy inetd.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
from collections.abc import Callable

import anyio

from .._core.container import _REAP_TIMEOUT, Container, spawn
from .._plan.steps import ContainerPlan
from .._wire import SpawnRequest
from .spec import ServiceSpec

__all__ = ["ConnectionServer", "accept_any", "readable_any"]


async def readable_any(sockets: list[socket.socket]) -> None:
    """Return once one of the listening sockets has a connection waiting."""
    async with anyio.create_task_group() as race:

        async def one(sock: socket.socket) -> None:
            await anyio.wait_readable(sock)
            race.cancel_scope.cancel()

        for sock in sockets:
            race.start_soon(one, sock)


async def accept_any(sockets: list[socket.socket]) -> tuple[socket.socket, str]:
    """Accept a connection on one of the (non-blocking) sockets; return it and its peer."""
    while True:
        for sock in sockets:
            try:
                connection, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                # A connection reset before it was accepted, or fds
                # exhausted for a moment: not the listener's end.
                logging.getLogger("asynccontainer.service").warning("accept failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            return connection, str(peer) if peer else "a Unix socket peer"
        await readable_any(sockets)


class ConnectionServer:
    """Runs a container for each connection to a service's sockets, until cancelled."""

    def __init__(
        self,
        spec: ServiceSpec,
        plan: tuple[ContainerPlan, SpawnRequest],
        sockets: list[socket.socket],
        *,
        log_fd: int,
        on_change: Callable[[], None],
        recent: collections.deque[str],
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.sockets = sockets
        self.log_fd = log_fd
        self.on_change = on_change
        # The service's recent_log: each connection's end is told there too.
        self.recent = recent
        self.active = 0
        self.served = 0
        self.logger = logging.getLogger(f"asynccontainer.service.{spec.name}")

    async def run(self) -> None:
        """Accept and serve until cancelled; then stop every connection's container.

        Cancellation: each running container gets the stop signal, SIGKILL
        after the grace period, and is reaped before this returns.
        """
        # A semaphore, not a CapacityLimiter: the connection's task releases it.
        limiter = anyio.Semaphore(self.spec.max_connections)
        async with anyio.create_task_group() as connections:
            while True:
                await limiter.acquire()
                try:
                    connection, peer = await accept_any(self.sockets)
                except BaseException:
                    limiter.release()
                    raise
                connections.start_soon(self._serve, connection, peer, limiter)

    async def _serve(self, connection: socket.socket, peer: str, limiter: anyio.Semaphore) -> None:
        self.active += 1
        self.on_change()
        try:
            with connection:
                fd = connection.fileno()
                container, root = await spawn(*self.plan, [fd, fd, self.log_fd])
            if root is not None:
                os.close(root)
            try:
                returncode = await container.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._end(container)
            self._note(logging.INFO, f"connection from {peer} ended with status {returncode}")
        except Exception as exc:
            self._note(logging.ERROR, f"connection from {peer}: its container did not start: {exc}")
        finally:
            self.active -= 1
            self.served += 1
            limiter.release()
            self.on_change()

    def _note(self, level: int, text: str) -> None:
        self.recent.append(text)
        self.logger.log(level, "%s", text)

    async def _end(self, container: Container) -> None:
        """Stop a connection's container if it runs (stop signal, then SIGKILL), and reap it."""
        if container.returncode is None:
            container.send_signal(self.spec.stop_signal)
            with anyio.move_on_after(self.spec.grace_period):
                await container.wait()
        if container.returncode is None:
            container.send_signal(signal.SIGKILL)
        with anyio.move_on_after(_REAP_TIMEOUT):
            await container.wait()
            await container._end_remains()
