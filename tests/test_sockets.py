"""Socket activation, lazy starts and a container per connection, under both backends."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import anyio
import pytest
from procfs import alive

import asynccontainer as ac

GRACE = 1.0

# A daemon written for socket activation, as sd_listen_fds(3) says: the
# sockets are fds 3 ... if LISTEN_PID is its own PID. It answers each
# connection with what it was given, then (with ONCE) exits.
ACTIVATED = """
import os, socket, sys
assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID is not mine"
count = int(os.environ["LISTEN_FDS"])
names = os.environ["LISTEN_FDNAMES"].split(":")
listeners = [socket.socket(fileno=3 + i) for i in range(count)]
while True:
    connection, _ = listeners[0].accept()
    with connection:
        connection.sendall(f"{os.getpid()} {os.environ['LISTEN_PID']} {count} {names}\\n".encode())
    if len(sys.argv) > 1:
        break
"""


def python(script: str, *args: str) -> list[str]:
    return ["/usr/bin/python3", "-c", script, *args]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def exchange(address: tuple[str, int] | str, data: bytes = b"") -> bytes:
    """Connect, send `data`, and return all that comes back."""
    with anyio.fail_after(20):
        if isinstance(address, str):
            stream: anyio.abc.ByteStream = await anyio.connect_unix(address)
        else:
            stream = await anyio.connect_tcp(*address)
        async with stream:
            if data:
                await stream.send(data)
            answer = b""
            try:
                while True:
                    answer += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return answer


async def test_an_activated_service_answers_on_the_socket_it_was_given() -> None:
    """Its own network namespace, yet it serves on the host's loopback, where the caller
    listens; LISTEN_PID is its PID in its pid namespace (not the host's)."""
    port = free_port()
    spec = ac.ServiceSpec(
        python(ACTIVATED),
        sockets=[ac.Endpoint(("127.0.0.1", port), name="web")],
        namespaces=ac.default_namespaces() | {"net"},
        grace_period=GRACE,
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        pid, listen_pid, count, names = (await exchange(("127.0.0.1", port))).decode().split(" ", 3)
        assert pid == listen_pid and int(pid) < 10  # a PID of its own namespace
        assert service.pid is not None and int(pid) != service.pid
        assert (count, names.strip()) == ("1", "['web']")
    with pytest.raises(OSError):
        await exchange(("127.0.0.1", port))  # closed with the group


async def test_an_ipv6_endpoint() -> None:
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    spec = ac.ServiceSpec(
        python(ACTIVATED), sockets=[ac.Endpoint(("::1", port))], grace_period=GRACE
    )
    async with ac.ServiceGroup() as group:
        await group.start(spec)
        answer = (await exchange(("::1", port))).decode()
        assert answer.endswith("1 ['python3']\n")


async def test_a_unix_socket_endpoint_and_two_names(tmp_path: Path) -> None:
    path = str(tmp_path / "web.sock")
    port = free_port()
    spec = ac.ServiceSpec(
        python(ACTIVATED),
        name="web",
        sockets=[ac.Endpoint(path), ac.Endpoint(("127.0.0.1", port), name="admin")],
        grace_period=GRACE,
    )
    async with ac.ServiceGroup() as group:
        await group.start(spec)
        answer = (await exchange(path)).decode()
        assert answer.endswith("2 ['web', 'admin']\n")
    assert not os.path.exists(path)


def running_with(marker: str) -> list[int]:
    """The PIDs of processes whose command line holds `marker`."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read():
                    found.append(int(name))
        except (OSError, ValueError):
            continue
    return found


async def test_lazy_start_on_the_first_connection_and_again_after_its_end() -> None:
    port = free_port()
    marker = f"lazy-{uuid.uuid4().hex}"
    spec = ac.ServiceSpec(
        python(ACTIVATED, "once", marker),
        sockets=[ac.Endpoint(("127.0.0.1", port))],
        lazy_start=True,
        grace_period=GRACE,
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert service.state == "listening" and service.pid is None
        assert running_with(marker) == []  # nothing runs before a connection
        first = await exchange(("127.0.0.1", port))  # waits for the start, not refused
        assert first.split()[0] == first.split()[1]
        with anyio.fail_after(10):
            while service.state != "listening":
                await anyio.sleep(0.01)
        second = await exchange(("127.0.0.1", port))
        assert second
        assert service.state in ("running", "listening")
    assert service.state == "stopped"


async def test_restart_of_a_lazy_service_stops_it_until_the_next_connection() -> None:
    port = free_port()
    spec = ac.ServiceSpec(
        python(ACTIVATED),
        sockets=[ac.Endpoint(("127.0.0.1", port))],
        lazy_start=True,
        grace_period=GRACE,
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        first = (await exchange(("127.0.0.1", port))).split()[0]
        pid = service.pid
        assert pid is not None
        await service.restart()
        assert not alive(pid)
        with anyio.fail_after(10):
            while service.state != "listening":
                await anyio.sleep(0.01)
        assert (await exchange(("127.0.0.1", port))).split()[0] == first  # PID 2 again
        assert service.pid != pid


async def test_restart_of_an_accepting_service_is_refused() -> None:
    spec = ac.ServiceSpec(["cat"], sockets=[ac.Endpoint(("127.0.0.1", free_port()))], accept=True)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        with pytest.raises(RuntimeError, match="accepts connections"):
            await service.restart()


async def test_accept_a_container_per_connection_and_max_connections() -> None:
    """Two connections at once get two containers (two pid namespaces); with
    max_connections=2 a third waits in the backlog until one ends."""
    port = free_port()
    script = "readlink /proc/self/ns/pid; read line; echo got $line"
    spec = ac.ServiceSpec(
        ["sh", "-c", script],
        sockets=[ac.Endpoint(("127.0.0.1", port))],
        accept=True,
        max_connections=2,
        grace_period=GRACE,
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert service.state == "listening"
        with anyio.fail_after(20):
            one = await anyio.connect_tcp("127.0.0.1", port)
            two = await anyio.connect_tcp("127.0.0.1", port)
            namespaces = {(await one.receive()).strip(), (await two.receive()).strip()}
            assert len(namespaces) == 2 and all(n.startswith(b"pid:[") for n in namespaces)
            assert service.connections == 2 and service.state == "running"
            three = await anyio.connect_tcp("127.0.0.1", port)  # in the backlog
            await anyio.sleep(0.3)
            assert service.connections == 2
            await one.send(b"first\n")
            assert (await one.receive()).strip() == b"got first"
            await one.aclose()
            # One ended: the third is accepted now.
            assert (await three.receive()).startswith(b"pid:[")
            await three.send(b"third\n")
            assert (await three.receive()).strip() == b"got third"
            await three.aclose()
        await two.aclose()  # its container is stopped with the group
    assert any("ended with status 0" in line for line in service.recent_log)


async def test_an_accepting_services_log_is_rotated_too(tmp_path: Path) -> None:
    """Its containers' stderr goes to its log_file, rotated as any service's."""
    port = free_port()
    log = tmp_path / "accept.log"
    spec = ac.ServiceSpec(
        ["sh", "-c", "echo a line of a connection, long enough to count >&2"],
        sockets=[ac.Endpoint(("127.0.0.1", port))],
        accept=True,
        log_file=str(log),
        log_max_bytes=1024,
        log_keep=50,
    )
    async with ac.ServiceGroup() as group:
        await group.start(spec)
        for _ in range(40):
            await exchange(("127.0.0.1", port))
    rotated = list(tmp_path.glob("accept.log.*"))
    assert rotated
    lines = [line for f in [*rotated, log] for line in f.read_text().splitlines()]
    assert sum("a line of a connection" in line for line in lines) == 40


async def test_a_port_in_use_is_an_error_before_anything_starts(tmp_path: Path) -> None:
    mark = tmp_path / "started"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = ac.ServiceSpec(
            ["sh", "-c", f"touch {mark}; exec sleep 60"],
            sockets=[ac.Endpoint(("127.0.0.1", port))],
        )
        async with ac.ServiceGroup() as group:
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
                await group.start(spec)
    assert not mark.exists()


async def test_the_callers_own_activation_is_not_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "3")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    spec = ac.ServiceSpec(["sh", "-c", 'echo "[$LISTEN_FDS$LISTEN_PID]"'])
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        with anyio.fail_after(10):
            await service.wait()
    assert service.recent_log == ["[]"]


@pytest.mark.parametrize(
    ("keywords", "error", "text"),
    [
        ({"lazy_start": True}, ValueError, "give it sockets too"),
        ({"accept": True}, ValueError, "give it sockets too"),
        (
            {"sockets": [ac.Endpoint("/run/x.sock")], "accept": True, "respawn": True},
            ValueError,
            "drop respawn",
        ),
        (
            {"sockets": [ac.Endpoint("/run/x.sock")], "pass_fds": [3]},
            ValueError,
            "where the sockets go",
        ),
        ({"sockets": ac.Endpoint("/run/x.sock")}, TypeError, "sequence of Endpoint"),
        ({"sockets": [("127.0.0.1", 80)]}, TypeError, "ac.Endpoint"),
        ({"max_connections": 0}, ValueError, "max_connections"),
    ],
)
def test_bad_socket_keywords(
    keywords: dict[str, object], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        ac.ServiceSpec(["true"], **keywords)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("relative.sock",), "absolute Unix socket path"),
        ((("localhost", 80),), "numeric address"),
        ((("127.0.0.1", 0),), "port is 1 to 65535"),
        ((("127.0.0.1", 80), "a:b"), "':'"),
        (("/" + "x" * 120,), "fewer than 108 bytes"),
    ],
)
def test_bad_endpoints(args: tuple[object, ...], text: str) -> None:
    with pytest.raises((TypeError, ValueError), match=text):
        ac.Endpoint(*args)  # type: ignore[arg-type]


def test_a_per_connection_container_takes_the_c_executors_path() -> None:
    """The per-connection plan is one the C executor runs (no Python step in it)."""
    from asynccontainer._plan import encode
    from asynccontainer._plan.build import plan_container
    from asynccontainer._services.spec import service_extras

    spec = ac.ServiceSpec(
        ["cat"], sockets=[ac.Endpoint(("127.0.0.1", 7000))], accept=True, user="nobody"
    )
    plan, _ = plan_container(spec.container_spec(), ["cat"], extras=service_extras(spec))
    assert encode.encode(plan) is not None


def test_endpoint_strings() -> None:
    assert str(ac.Endpoint(("::1", 8080))) == "[::1]:8080"
    assert str(ac.Endpoint(("", 8080))) == "0.0.0.0:8080"
    assert str(ac.Endpoint("/run/web.sock")) == "/run/web.sock"
    assert alive(os.getpid())
