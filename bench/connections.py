"""Scenario 10: a container per connection (`accept=True`) against fork per connection.

The baselines are what inetd, `socat TCP-LISTEN,fork` and
`systemd-socket-activate --inetd` do: fork and exec the program per
connection, with no container; and the same with bubblewrap per
connection (socat running a one-line sh script that execs bwrap). Each
connection runs `/bin/echo hi`; the client connects, reads to the end of
the stream, and closes.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import anyio

import asynccontainer as ac

from .scenarios import NAMESPACES, Result, Series, bwrap_argv

_COMMAND = ["/bin/echo", "hi"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _connect(port: int) -> None:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        answer = b""
        try:
            while True:
                answer += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    if answer != b"hi\n":
        raise RuntimeError(f"the server answered {answer!r}")


async def _until_listening(port: int) -> None:
    with anyio.fail_after(10):
        while True:
            try:
                await _connect(port)
                return
            except OSError:
                await anyio.sleep(0.02)


@asynccontextmanager
async def _socat(port: int, exec_target: str) -> AsyncIterator[None]:
    argv = [
        "socat",
        f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=128",
        f"EXEC:{exec_target}",
    ]
    async with await anyio.open_process(argv) as process:
        try:
            await _until_listening(port)
            yield
        finally:
            process.terminate()
            await process.wait()


@asynccontextmanager
async def _servers(directory: str) -> AsyncIterator[dict[str, int]]:
    """Start the three servers side by side; yield the port of each."""
    ports = {
        name: _free_port() for name in ("asynccontainer accept", "socat fork", "socat + bwrap")
    }
    script = os.path.join(directory, "bwrap.sh")
    with open(script, "w") as file:
        file.write("#!/bin/sh\nexec " + " ".join(bwrap_argv(_COMMAND)) + "\n")
    os.chmod(script, 0o755)
    async with AsyncExitStack() as stack:
        group = await stack.enter_async_context(ac.ServiceGroup())
        spec = ac.ServiceSpec(
            _COMMAND,
            namespaces=NAMESPACES,
            sockets=[ac.Endpoint(("127.0.0.1", ports["asynccontainer accept"]))],
            accept=True,
            max_connections=64,
        )
        await group.start(spec)
        await _until_listening(ports["asynccontainer accept"])
        await stack.enter_async_context(_socat(ports["socat fork"], " ".join(_COMMAND)))
        await stack.enter_async_context(_socat(ports["socat + bwrap"], script))
        yield ports


async def connection_latency(runs: int) -> Result:
    """Scenario 10a: connect to the end of the answer, one connection at a time."""
    with tempfile.TemporaryDirectory() as directory:
        async with _servers(directory) as ports:
            series = {name: Series(name) for name in ports}
            order = list(ports.items())
            for _ in range(runs):
                random.shuffle(order)
                for name, port in order:
                    started = time.perf_counter()
                    await _connect(port)
                    series[name].values.append(time.perf_counter() - started)
    return Result(
        "a connection's latency: a container per connection against fork per connection",
        "ms",
        list(series.values()),
        baseline="socat fork",
        notes=[
            "socat fork: fork and exec per connection, no container (inetd's way)",
            "socat + bwrap: the same, exec'ing a one-line sh script that execs bwrap",
        ],
    )


async def connections_per_second(total: int, concurrency: int) -> Result:
    """Scenario 10b: connections served per second with `concurrency` clients at once."""
    with tempfile.TemporaryDirectory() as directory:
        async with _servers(directory) as ports:
            series = {name: Series(name) for name in ports}
            order = list(ports.items())
            for _ in range(3):
                random.shuffle(order)
                for name, port in order:
                    series[name].values.append(await _rate(port, total, concurrency))
    return Result(
        f"connections per second, {concurrency} clients at once",
        "per s",
        list(series.values()),
        baseline="socat fork",
        higher_is_better=True,
    )


async def _rate(port: int, total: int, concurrency: int) -> float:
    limiter = anyio.CapacityLimiter(concurrency)
    started = time.perf_counter()

    async def one(connect: Callable[[int], Awaitable[None]] = _connect) -> None:
        async with limiter:
            await connect(port)

    async with anyio.create_task_group() as clients:
        for _ in range(total):
            clients.start_soon(one)
    return total / (time.perf_counter() - started)
