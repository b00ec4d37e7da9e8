"""Debian's own daemons as services, each configured through its ServiceSpec alone.

Installed by .ci/run (nginx-light, redis-server, memcached, dnsmasq-base,
lighttpd, openssh-server, with a policy-rc.d that keeps them from starting
on the host). Each listens on 127.0.0.1 on a port of its own; its
configuration file is mapped read-only, and everything else it needs
(its /run, its state, cache and log directories, its user) comes from
the spec. After each group, no process of the daemon is left and its
runtime directory is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from procfs import alive, children_of

import asynccontainer as ac

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="daemons start as root, then drop")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def name() -> Iterator[str]:
    """A directory name of the test's own; what it left under /var is removed after."""
    unique = f"ac-test-{uuid.uuid4().hex[:8]}"
    yield unique
    for base in ("/run", "/var/lib", "/var/cache", "/var/log"):
        shutil.rmtree(Path(base) / unique, ignore_errors=True)


def config(tmp_path: Path, text: str, filename: str = "daemon.conf") -> ac.FileSystemMapping:
    """Write a configuration file; return its mapping at /etc/ac-test, read-only."""
    (tmp_path / filename).write_text(text)
    # Readable by a daemon's user: inside, only this directory is seen, not its parents.
    tmp_path.chmod(0o755)
    return ac.FileSystemMapping(str(tmp_path), "/etc/ac-test")


async def ask(port: int, request: bytes) -> bytes:
    """Send `request` on a TCP connection; return all that comes back."""
    with anyio.fail_after(10):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
                break
            except OSError:
                await anyio.sleep(0.02)  # a daemon in the foreground: not listening yet
        async with stream:
            if request:
                await stream.send(request)
            data = b""
            try:
                while True:
                    data += await stream.receive()
                    if not request:
                        return data  # a banner
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return data


async def wait_gone(pids: list[int]) -> None:
    with anyio.fail_after(10):
        while any(alive(pid) for pid in pids):
            await anyio.sleep(0.02)


def children(pid: int) -> list[int]:
    return sorted(children_of(pid))


def user_of(pid: int) -> str:
    import pwd

    return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name


# -- nginx: forking, a PID file, www-data workers ------------------------------------

NGINX = """
user www-data;
worker_processes 2;
pid /run/nginx.pid;
error_log /var/log/{name}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log /var/log/{name}/access.log;
    client_body_temp_path /var/lib/{name}/body;
    proxy_temp_path /var/lib/{name}/proxy;
    fastcgi_temp_path /var/lib/{name}/fastcgi;
    uwsgi_temp_path /var/lib/{name}/uwsgi;
    scgi_temp_path /var/lib/{name}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
"""


def nginx(tmp_path: Path, name: str, port: int, **keywords: object) -> ac.ServiceSpec:
    return ac.ServiceSpec(
        ["nginx", "-c", "/etc/ac-test/daemon.conf"],
        mappings=[config(tmp_path, NGINX.format(name=name, port=port))],
        pid_file="/run/nginx.pid",
        state_directories=[name],
        logs_directories=[name],
        stop_signal="SIGQUIT",  # nginx's graceful stop
        grace_period=5,
        **keywords,  # type: ignore[arg-type]
    )


async def nginx_workers(master: int) -> list[int]:
    """Return the master's two workers once both run as www-data.

    The PID file may come before the workers are forked, and a worker
    switches to its user just after its fork.
    """
    with anyio.fail_after(10):
        while True:
            workers = children(master)
            if len(workers) == 2 and {user_of(pid) for pid in workers} == {"www-data"}:
                return workers
            await anyio.sleep(0.01)


async def test_nginx(tmp_path: Path, name: str) -> None:
    port = free_port()
    spec = nginx(tmp_path, name, port)
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert service.pid is not None and user_of(service.pid) == "root"  # the master
        workers = await nginx_workers(service.pid)
        answer = await ask(port, b"GET / HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from nginx\n")
        everything = [service.pid, *workers]
    assert service.returncode == 0  # SIGQUIT: it finished its requests and exited
    await wait_gone(everything)
    assert "GET / HTTP/1.0" in Path(f"/var/log/{name}/access.log").read_text()


async def test_nginx_master_killed_is_respawned_with_no_worker_left(
    tmp_path: Path, name: str
) -> None:
    """The master is the main process (its PID file's): SIGKILL of it ends the service at
    once, its workers are stopped (they would serve on), and respawn starts a new one."""
    port = free_port()
    spec = nginx(tmp_path, name, port, respawn=True)
    async with ac.ServiceGroup() as group:
        events = group.events()
        service = await group.start(spec)
        master = service.pid
        assert master is not None
        workers = await nginx_workers(master)
        os.kill(master, signal.SIGKILL)
        restarting = False
        with anyio.fail_after(20):
            async for event in events:
                if event.state == "restarting":
                    assert event.returncode == -signal.SIGKILL
                    restarting = True
                if restarting and event.state == "running":
                    break
        events.close()
        await wait_gone([master, *workers])
        assert service.restarts == 1 and service.pid not in (None, master)
        answer = await ask(port, b"GET / HTTP/1.0\r\n\r\n")
        assert answer.endswith(b"hello from nginx\n")
        everything = [service.pid, *children(service.pid)]
    await wait_gone(everything)


# -- memcached: in the foreground, as its user ---------------------------------------


async def test_memcached_as_its_user() -> None:
    port = free_port()
    spec = ac.ServiceSpec(
        ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0"], user="memcache"
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert service.pid is not None and user_of(service.pid) == "memcache"
        assert (await ask(port, b"version\r\nquit\r\n")).startswith(b"VERSION ")
        pid = service.pid
    await wait_gone([pid])


# -- redis: forking as its user, with a PID file in its runtime directory -----------


async def test_redis_forking_as_its_user(name: str) -> None:
    port = free_port()
    pid_file = f"/run/{name}/redis.pid"
    spec = ac.ServiceSpec(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--daemonize", "yes", "--pidfile", pid_file, "--dir", f"/var/lib/{name}"),
            *("--save", "", "--appendonly", "no", "--logfile", ""),
        ],
        user="redis",
        pid_file=pid_file,
        runtime_directories=[name],
        state_directories=[name],
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert service.pid is not None and user_of(service.pid) == "redis"
        assert await ask(port, b"PING\r\nQUIT\r\n") == b"+PONG\r\n+OK\r\n"
        assert os.stat(f"/run/{name}").st_uid == os.stat(f"/proc/{service.pid}").st_uid
        pid = service.pid
    await wait_gone([pid])
    assert not os.path.exists(f"/run/{name}")


async def test_redis_with_notify(name: str) -> None:
    """redis speaks sd_notify with --supervised systemd: READY=1 once it accepts
    connections, and a STATUS= text."""
    port = free_port()
    spec = ac.ServiceSpec(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--supervised", "systemd", "--daemonize", "no", "--dir", f"/var/lib/{name}"),
            *("--save", "", "--appendonly", "no"),
        ],
        user="redis",
        notify=True,
        state_directories=[name],
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        # Ready means ready: no retry needed to connect.
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            await stream.send(b"PING\r\n")
            assert await stream.receive() == b"+PONG\r\n"
        assert service.status_text.startswith("Ready to accept connections")
        assert service.pid is not None and user_of(service.pid) == "redis"
        pid = service.pid
    await wait_gone([pid])


# -- dnsmasq: a DNS query answered ----------------------------------------------------


def dns_query(port: int, host: str) -> bytes:
    """Ask for the A record of `host`; return the answer's address (4 bytes)."""
    question = b"".join(bytes([len(part)]) + part.encode() for part in host.split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + question + b"\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Short, and tried again: a query sent before dnsmasq binds is lost
        # (an unconnected UDP socket hears no ICMP error).
        sock.settimeout(0.25)
        sock.sendto(packet, ("127.0.0.1", port))
        answer, _ = sock.recvfrom(512)
    return answer[-4:]


async def test_dnsmasq_answers_a_query() -> None:
    port = free_port()
    spec = ac.ServiceSpec(
        [
            # getopt_long: an optional argument (--user) only after "=".
            *("dnsmasq", "--keep-in-foreground", f"--port={port}"),
            *("--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts"),
            *("--address=/asynccontainer.test/10.1.2.3", "--user=dnsmasq"),
        ],
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        with anyio.fail_after(10):
            while True:
                try:
                    address = await anyio.to_thread.run_sync(dns_query, port, "asynccontainer.test")
                    break
                except OSError:
                    await anyio.sleep(0.05)  # not bound yet
        assert socket.inet_ntoa(address) == "10.1.2.3"
        assert service.pid is not None and user_of(service.pid) == "dnsmasq"


# -- lighttpd and sshd: a broken configuration fails the start, with why ---------------

LIGHTTPD = """
server.port = {port}
server.bind = "127.0.0.1"
server.document-root = "/etc/ac-test"
server.pid-file = "/run/{name}/lighttpd.pid"
server.upload-dirs = ( "/tmp" )
server.errorlog = "/var/log/{name}/error.log"
{extra}
"""


async def test_lighttpd_good_and_broken(tmp_path: Path, name: str) -> None:
    port = free_port()
    (tmp_path / "index.html").write_text("hello from lighttpd\n")

    def spec(extra: str) -> ac.ServiceSpec:
        text = LIGHTTPD.format(port=port, name=name, extra=extra)
        return ac.ServiceSpec(
            ["lighttpd", "-f", "/etc/ac-test/daemon.conf"],
            mappings=[config(tmp_path, text)],
            pid_file=f"/run/{name}/lighttpd.pid",
            # A high port: it runs as www-data from the start, and its log
            # directory is www-data's (it opens its error log as that user).
            user="www-data",
            runtime_directories=[name],
            logs_directories=[name],
        )

    async with ac.ServiceGroup() as group:
        with pytest.raises(ac.ServiceStartError) as caught:
            await group.start(spec('server.modules += ( "mod_'))  # a syntax error
        # Its parser's complaint (before its error log opens), with the line.
        assert caught.value.returncode == 255
        assert any("daemon.conf line: 8" in line for line in caught.value.log), caught.value.log
        assert "configfile parser failed" in str(caught.value)
        service = await group.start(spec(""))
        assert (await ask(port, b"GET /index.html HTTP/1.0\r\n\r\n")).endswith(
            b"hello from lighttpd\n"
        )
        assert service.pid is not None and user_of(service.pid) == "www-data"
        pid = service.pid
    await wait_gone([pid])
    assert not os.path.exists(f"/run/{name}")


SSHD = """
Port {port}
ListenAddress 127.0.0.1
HostKey /etc/ac-test/host_key
PidFile /run/{name}/sshd.pid
UsePAM no
{extra}
"""


async def test_sshd_good_and_broken(tmp_path: Path, name: str) -> None:
    port = free_port()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host_key")],
        check=True,
    )

    def spec(extra: str) -> ac.ServiceSpec:
        return ac.ServiceSpec(
            ["/usr/sbin/sshd", "-f", "/etc/ac-test/daemon.conf"],
            mappings=[config(tmp_path, SSHD.format(port=port, name=name, extra=extra))],
            pid_file=f"/run/{name}/sshd.pid",
            # Its privilege separation directory, and where its PID file goes.
            runtime_directories=["sshd", name],
        )

    async with ac.ServiceGroup() as group:
        with pytest.raises(ac.ServiceStartError) as caught:
            await group.start(spec("NoSuchOption yes"))
        assert "Bad configuration option: NoSuchOption" in "\n".join(caught.value.log)
        assert str(caught.value).endswith("terminating, 1 bad configuration options")
        await group.start(spec(""))
        assert (await ask(port, b"")).startswith(b"SSH-2.0-OpenSSH")
    assert not os.path.exists(f"/run/{name}")
