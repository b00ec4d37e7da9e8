r"""Run untrusted shell or Python snippets in containers, behind a tiny asyncio HTTP server.

Each request runs its snippet in a container of its own, with a time limit,
and gets back what the snippet printed and how it ended, as JSON::

    python examples/untrusted_snippets.py --port 8080     # serve until Ctrl-C
    curl --data 'echo hello from $(hostname)' http://127.0.0.1:8080/run
    curl --data 'print(6 * 7)' 'http://127.0.0.1:8080/run?lang=python'
    # {"status": 0, "stdout": "42\n", "timed_out": false, "truncated": false}

    python examples/untrusted_snippets.py --demo          # try a few snippets, then exit

The HTTP part is a hand-written minimum (one request per connection, a
Content-Length body, no framework) so that the example depends on nothing
but asyncio and asynccontainer; the containers are the point.

Run the server as an unprivileged user: the snippet is root only inside its
user namespace, where root is mapped to the uid that runs this server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit

import anyio

import asynccontainer as ac

# What one request may send, and what a snippet may print, at most.
MAX_BODY = 64 * 1024
MAX_OUTPUT = 64 * 1024

# Limits of the kernel's own (setrlimit), set by the shell that starts each
# snippet: 10 s of CPU, files of 1 MiB at most (in the writable /tmp), 512
# MiB of address space. The container adds isolation, not resource control:
# without these (or a cgroup), a snippet could still eat the host's memory.
LIMITS = "ulimit -t 10; ulimit -f 2048; ulimit -v 524288"

# The programs that run a snippet, by language. The snippet is an argument
# of its own, never pasted into a shell command line.
INTERPRETERS = {
    "sh": ["sh", "-c", LIMITS + '; exec sh -c "$1"', "limits"],
    "python": ["sh", "-c", LIMITS + '; exec python3 -I -c "$1"', "limits"],
}


async def run_snippet(code: str, *, lang: str = "sh", timeout: float = 2.0) -> dict[str, Any]:
    """Run `code` in a new container and return what it printed and how it ended.

    Returns:
        {"status", "stdout", "timed_out", "truncated"}: the exit status
        (subprocess's convention: -9 for a snippet killed by SIGKILL), its
        stdout and stderr together (at most MAX_OUTPUT bytes), whether it
        ran out of time (then it was killed), and whether its output was cut
        (then it was killed too).
    """
    read_end, write_end = os.pipe()
    try:
        container = await ac.run_container(
            [*INTERPRETERS[lang], code],
            # Every namespace new (cgroup, mnt, pid, ipc, uts, user, net):
            # - mnt: the snippet sees only the file systems below, not the host's;
            # - pid: it is PID 1 of its own tree and sees no host process
            #   (so it cannot signal or ptrace any of them);
            # - net: it has only a loopback interface, so no network at all;
            # - user: uid 0 inside is the server's own uid outside, and its
            #   capabilities count only in namespaces it owns, not on the host;
            # - uts, ipc, cgroup: its own host name, System V IPC and cgroup view.
            namespaces=ac.NAMESPACES,
            # root=None: a fresh, empty tmpfs as the root file system, turned
            # read-only once set up (writable_root=False): writing to / fails.
            root=None,
            writable_root=False,
            mounts=[
                # The host's program directories (/usr, /bin, /lib ...),
                # bind-mounted read-only: sh and python3 run, nothing changes.
                *ac.HOST_SYSTEM_MAPPINGS,
                # A small tmpfs on /tmp, private to this container and gone
                # with it: the one place the snippet may write.
                ac.WRITABLE_TMP,
            ],
            hostname="sandbox",
            # Exactly this environment: nothing of the server's (secrets in
            # variables stay out).
            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"},
            cwd="/tmp",
            # No input; stdout and stderr into our pipe.
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=write_end,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        # The container has its own copy: end-of-file comes when it is gone.
        os.close(write_end)

    output = bytearray()
    truncated = False
    # Leaving this block kills the container if it still runs, and reaps it:
    # on a timeout, on too much output, or if this request is cancelled.
    try:
        async with container:
            with anyio.move_on_after(timeout) as deadline:
                truncated = await _read_at_most(read_end, output, MAX_OUTPUT)
                if truncated:
                    container.kill()
                await container.wait()
    finally:
        os.close(read_end)
    return {
        "status": container.returncode,
        "stdout": output.decode("utf-8", errors="replace"),
        "timed_out": deadline.cancelled_caught,
        "truncated": truncated,
    }


async def _read_at_most(fd: int, into: bytearray, limit: int) -> bool:
    """Read `fd` until end-of-file into `into`; return True if it had more than `limit` bytes."""
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        if not chunk:
            return False
        into += chunk
        if len(into) > limit:
            del into[limit:]
            return True


# -- a minimal HTTP server -------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
}

USAGE = """\
POST a snippet to /run to run it in a container:
  curl --data 'echo hello from $(hostname)' URL/run
  curl --data 'print(6 * 7)' 'URL/run?lang=python'
The answer is JSON: {"status", "stdout", "timed_out", "truncated"}.
"""


async def _respond(writer: asyncio.StreamWriter, code: int, body: Any) -> None:
    """Write one HTTP response: JSON for dicts, text otherwise."""
    if isinstance(body, dict):
        data, kind = (json.dumps(body) + "\n").encode(), "application/json"
    else:
        data, kind = str(body).encode(), "text/plain; charset=utf-8"
    head = (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + data)
    await writer.drain()


class HTTPError(Exception):
    """An answer other than 200 OK: its status code and a line of text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text


async def read_request(reader: asyncio.StreamReader) -> tuple[str, SplitResult, bytes]:
    """Read one HTTP request; return its method, URL and body.

    Raises:
        HTTPError: 400 for what is not HTTP, 413 for a body over MAX_BODY.
    """
    request_line = (await reader.readline()).decode("latin-1").split()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if len(request_line) != 3:
        raise HTTPError(400, "bad request line\n")
    method, target, _version = request_line
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HTTPError(400, "bad Content-Length\n") from None
    if not 0 <= length <= MAX_BODY:
        raise HTTPError(413, f"at most {MAX_BODY} bytes\n")
    return method, urlsplit(target), await reader.readexactly(length)


class SnippetServer:
    """Answers POST /run with the result of run_snippet; one container per request."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one request on a new connection, then close it."""
        try:
            try:
                # A slow client does not hold a connection for long.
                with anyio.fail_after(10):
                    method, url, body = await read_request(reader)
                code, answer = 200, await self.answer(method, url, body)
            except HTTPError as exc:
                code, answer = exc.code, exc.text
            await _respond(writer, code, answer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away, or was too slow
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def answer(self, method: str, url: SplitResult, body: bytes) -> Any:
        """Return the answer to a request: usage text, or a snippet's result."""
        if url.path == "/" and method == "GET":
            return USAGE
        if url.path != "/run":
            raise HTTPError(404, USAGE)
        if method != "POST":
            raise HTTPError(405, "use POST\n")
        lang = parse_qs(url.query).get("lang", ["sh"])[0]
        if lang not in INTERPRETERS:
            raise HTTPError(400, f"lang is one of {', '.join(INTERPRETERS)}\n")
        code = body.decode("utf-8", errors="replace")
        return await run_snippet(code, lang=lang, timeout=self.timeout)


async def serve(
    port: int,
    timeout: float,
    then: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Serve on 127.0.0.1:`port` until SIGINT or SIGTERM, or until `then(url)` returns."""
    app = SnippetServer(timeout)
    requests: set[asyncio.Task[None]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        requests.add(task)
        try:
            await app.handle(reader, writer)
        except asyncio.CancelledError:
            pass  # the server is stopping; the container was killed and reaped
        finally:
            requests.discard(task)

    # 127.0.0.1 only: a service that runs code sent to it is for this host.
    server = await asyncio.start_server(connection, "127.0.0.1", port)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        if then is None:
            print(f"listening on {url}/ (Ctrl-C stops)", flush=True)
            print(USAGE.replace("URL", url), flush=True)
            await stop.wait()
        else:
            await then(url)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        server.close()
        # Requests under way are cancelled: their containers are killed and reaped.
        for task in list(requests):
            task.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        await server.wait_closed()


# -- the demo: a client of the server above ----------------------------------------

DEMO = [
    ("sh", "a snippet that prints", 'echo "hello from $(hostname), uid $(id -u), pid $$"'),
    ("python", "Python counting", "print(sum(range(10)))"),
    ("sh", "a snippet that loops forever", "while :; do :; done"),
    ("sh", "writing to /", "echo owned > /etc/motd; touch /evil"),
    ("sh", "printing without end", "yes"),
    (
        "python",
        "reaching the network",
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
        "    print('reached the network')\n"
        "except OSError as exc:\n"
        "    print('no network:', exc)\n",
    ),
    ("sh", "writing to /tmp", "echo scratch > /tmp/f && cat /tmp/f"),
]


async def post(url: str, body: str) -> dict[str, Any]:
    """POST `body` to `url` (http://127.0.0.1:PORT/PATH) and return the JSON answer."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        data = body.encode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the server answered {head.splitlines()[0]!r}")
    result: dict[str, Any] = json.loads(payload)
    return result


async def demo(url: str) -> None:
    """Send every DEMO snippet to the server at once and print what came back."""
    print(f"server at {url}/", flush=True)
    answers = await asyncio.gather(
        *(post(f"{url}/run?lang={lang}", code) for lang, _, code in DEMO)
    )
    for (lang, what, code), answer in zip(DEMO, answers, strict=True):
        lines = code.strip().splitlines()
        shown = lines[0] + (" ..." if len(lines) > 1 else "")
        if len(answer["stdout"]) > 200:
            answer["stdout"] = answer["stdout"][:40] + f"... ({len(answer['stdout'])} characters)"
        print(f"--- {what} ({lang}: {shown})")
        print(json.dumps(answer), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; serve, or run the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="0: any free port")
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="seconds each snippet may run (2)"
    )
    parser.add_argument(
        "--demo", action="store_true", help="send a few snippets to itself, print, exit"
    )
    arguments = parser.parse_args(argv)
    if not ac.containers_supported():
        print("this kernel cannot run containers: see `asynccontainer check`", file=sys.stderr)
        return 1
    port = 0 if arguments.demo else arguments.port
    asyncio.run(serve(port, arguments.timeout, demo if arguments.demo else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
