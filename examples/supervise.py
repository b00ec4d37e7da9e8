"""Supervise a few services under trio: a web server, a forking daemon and a flaky job.

Run it as root (the web server switches to the user nobody, which only
root may do, as with Shepherd):  python examples/supervise.py [--seconds 5]

Each service runs in a container of its own (new mnt, pid, ipc, uts and
cgroup namespaces; the host's network and uids), started concurrently by a
ServiceGroup. The program prints one status line per service every second,
fetches a page from the web server, and after --seconds leaves the group's
block, which stops every service (SIGTERM, then SIGKILL after its grace
period): nothing outlives the block.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile

import trio

import asynccontainer as ac


def specs(log_dir: str) -> list[ac.ServiceSpec]:
    """Return the services to run, their logs in `log_dir`."""
    return [
        # A web server on a free port of 127.0.0.1 (port 0: the kernel picks
        # one; it prints which). -u: unbuffered, so each line reaches the log
        # at once. It runs as nobody, and its output (stdout and stderr) goes
        # to a log file, each line prefixed with the date and time.
        ac.ServiceSpec(
            ["python3", "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"],
            name="web",
            directory="/usr/share/doc",
            user="nobody",
            log_file=os.path.join(log_dir, "web.log"),
            grace_period=2,
        ),
        # A classic daemon: the command forks, the child lives on, the parent
        # writes the child's PID to a file and exits. The service is started
        # when the PID file names a live process, and that process (its host
        # PID, translated from the container's PID namespace) is the service.
        ac.ServiceSpec(
            ["sh", "-c", "mkdir -p /var/run; sleep 3600 & echo $! > /var/run/daemon.pid"],
            name="daemon",
            pid_file="/var/run/daemon.pid",
            pid_file_timeout=5,
        ),
        # A job that fails after a moment: respawned each time (restarts
        # counts them), until it dies more than 5 times in 7 seconds. Without
        # a log file, its lines go to the logger "asynccontainer.service.flaky".
        ac.ServiceSpec(
            ["sh", "-c", "echo starting; sleep 1.5; echo failing; exit 3"],
            name="flaky",
            respawn=True,
            grace_period=1,
        ),
    ]


def status_line(service: ac.Service) -> str:
    """Describe a service in one line: name, host PID, state, restarts."""
    if service.running:
        state = f"running  pid {service.pid:<7} up {service.uptime:4.1f} s"
    elif service.disabled:
        state = "disabled (it died too often)"
    else:
        state = "restarting" if service.spec.respawn else "stopped"
    return f"{service.name:7} {state:34} restarts {service.restarts}"


async def web_port(log_file: str) -> int:
    """Wait until the web server says which port it serves on; return it."""
    with trio.fail_after(10):
        while True:
            text = await trio.Path(log_file).read_text()
            found = re.search(r"Serving HTTP on \S+ port (\d+)", text)
            if found:
                return int(found.group(1))
            await trio.sleep(0.05)


async def fetch(port: int, path: str) -> str:
    """GET http://127.0.0.1:`port``path` and return the response's status line."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        response = b""
        while b"\r\n" not in response:
            chunk = await stream.receive_some()
            if not chunk:
                break
            response += chunk
    return response.split(b"\r\n", 1)[0].decode()


async def main(seconds: float) -> None:
    """Start the services, report on them for `seconds`, then stop them all."""
    with tempfile.TemporaryDirectory(prefix="supervise-") as log_dir:
        async with ac.ServiceGroup() as group:
            # Started concurrently: the nursery ends when all are ready.
            async with trio.open_nursery() as nursery:
                for spec in specs(log_dir):
                    nursery.start_soon(group.start, spec)
            by_name = {service.name: service for service in group.services}
            web, daemon, flaky = by_name["web"], by_name["daemon"], by_name["flaky"]

            port = await web_port(os.path.join(log_dir, "web.log"))
            print(f"web serves http://127.0.0.1:{port}/: GET / -> {await fetch(port, '/')}")

            started = trio.current_time()
            while (elapsed := trio.current_time() - started) < seconds:
                print(f"--- after {elapsed:.0f} s")
                for service in (web, daemon, flaky):
                    print(status_line(service), flush=True)
                await trio.sleep(min(1.0, seconds - elapsed))
            print("--- leaving the group: every service is stopped", flush=True)
        # Out of the block: each service was stopped and waited for.
        for service in (web, daemon, flaky):
            print(f"{service.name:7} ended with status {service.returncode}")
        with open(os.path.join(log_dir, "web.log")) as log:
            print("the web server's log:")
            sys.stdout.write("".join("  " + line for line in log))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="how long to run (4)")
    # Where the services without a log file write, and the supervisor's news.
    logging.basicConfig(level=logging.INFO, format="  [log] %(name)s: %(message)s")
    trio.run(main, parser.parse_args().seconds)
