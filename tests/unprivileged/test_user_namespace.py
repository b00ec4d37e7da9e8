"""The user-namespace path, as root and (through tests/test_unprivileged.py) as nobody.

Each assertion holds for both: what differs (the host id mapped, setgroups)
is read from the running process.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest
from capture import forge_reply, sh
from procfs import alive

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS
ROOT = os.geteuid() == 0


async def run_sh(script: str, **keywords: object) -> tuple[int, str]:
    return await sh(script, with_stderr=True, **keywords)


async def test_root_inside_and_the_callers_ids_mapped() -> None:
    returncode, out = await run_sh(
        "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map", lock_mounts=False
    )
    assert returncode == 0, out
    lines = out.splitlines()
    assert lines[:2] == ["0", "0"]
    assert lines[2].split() == ["0", str(os.geteuid()), "1"]
    assert lines[3].split() == ["0", str(os.getegid()), "1"]


async def test_setgroups_is_denied_unless_root() -> None:
    returncode, out = await run_sh("cat /proc/self/setgroups", lock_mounts=False)
    assert returncode == 0, out
    assert out.strip() == ("allow" if ROOT else "deny")


async def test_more_than_one_host_id_needs_root() -> None:
    if ROOT:
        returncode, out = await run_sh("cat /proc/self/uid_map", host_uids=1000, lock_mounts=False)
        assert returncode == 0, out
        assert out.split() == ["0", "0", "1000"]
    else:
        with pytest.raises(ValueError, match="only root may map more than one id"):
            await ac.run_container(["true"], host_uids=2)


async def test_tmpfs_mount_is_visible_inside() -> None:
    tmpfs = ac.FileSystem("none", "/scratch", "tmpfs", options="size=1m")
    returncode, out = await run_sh(
        "echo hi > /scratch/file && cat /scratch/file && grep ' /scratch ' /proc/self/mountinfo",
        mounts=[*SYSTEM, tmpfs],
    )
    assert returncode == 0, out
    assert out.startswith("hi\n")
    assert " - tmpfs " in out


async def test_locked_mounts_cannot_be_unmounted() -> None:
    tmpfs = ac.FileSystem("none", "/scratch", "tmpfs")

    def try_umount() -> None:
        from asynccontainer import _kernel

        try:
            _kernel.umount2("/scratch")
        except OSError as exc:
            raise SystemExit(10 if exc.errno == errno.EINVAL else 11) from None
        raise SystemExit(12)

    # Every capability kept, CAP_SYS_ADMIN above all: only the lock stops
    # the umount (EINVAL, where a missing capability would give EPERM).
    everything = ac.ALL_CAPABILITIES
    assert await ac.call_with_container(try_umount, mounts=[tmpfs], capabilities=everything) == 10
    # Without locking, the same umount succeeds.
    unlocked = await ac.call_with_container(
        try_umount, mounts=[tmpfs], lock_mounts=False, capabilities=everything
    )
    assert unlocked == 12


async def test_missing_bind_source_raises_enoent_in_the_caller(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as info:
        await ac.run_container(["true"], mounts=[ac.FileSystemMapping(str(missing))])
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(missing)


async def test_read_only_root_and_pid_1() -> None:
    returncode, out = await run_sh("echo $$; mkdir /x 2>&1; echo $?")
    assert returncode == 0, out
    pid, message, status = out.splitlines()
    assert pid == "1"
    assert "Read-only file system" in message
    assert status != "0"


async def test_hostname_and_callable() -> None:
    def check() -> None:
        import socket

        assert socket.gethostname() == "unpriv"
        assert os.getuid() == 0

    assert await ac.call_with_container(check, hostname="unpriv") == 0


async def test_cancellation_kills_and_reaps() -> None:
    with anyio.move_on_after(0.3) as scope:
        await ac.call_with_container(["sleep", "60"], mounts=SYSTEM)
    assert scope.cancelled_caught


async def test_excursion_into_own_container() -> None:
    async with await ac.run_container(["sleep", "300"], mounts=SYSTEM, hostname="mine") as box:
        assert await ac.container_excursion(box, ["sh", "-c", "test $(hostname) = mine"]) == 0
        uid = await ac.container_excursion_value(box, os.getuid)
        assert uid == 0


async def test_excursion_into_another_users_process() -> None:
    if ROOT:
        # Root may enter a process of any user.
        setpriv = shutil.which("setpriv")
        assert setpriv
        other = subprocess.Popen(
            [
                *(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"),
                *("sh", "-c", "echo ready; exec sleep 300"),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            # Once it says so, setpriv has switched to nobody.
            assert other.stdout is not None
            with anyio.fail_after(10):
                assert await anyio.to_thread.run_sync(other.stdout.readline) == b"ready\n"
            assert await ac.container_excursion(other.pid, ["true"]) == 0
        finally:
            other.kill()
            other.wait()
            assert other.stdout is not None
            other.stdout.close()
    else:
        foreign = os.environ.get("ASYNCCONTAINER_TEST_FOREIGN_PID")
        assert foreign, "run by tests/test_unprivileged.py, which starts a process of root's"
        with pytest.raises(PermissionError):
            await ac.container_excursion(int(foreign), ["true"])


async def test_pid_file_of_a_daemon_in_the_container() -> None:
    script = "mkdir -p /run; sh -c 'echo $$ > /run/d.pid; exec sleep 300' & wait"
    async with await ac.run_container(
        ["sh", "-c", script], mounts=SYSTEM, writable_root=True
    ) as box:
        pid = await ac.read_pid_file("/run/d.pid", container=box, timeout=5)
        assert pid != box.pid
        assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{box.pid}/ns/pid")


async def test_capabilities_without_a_user_namespace() -> None:
    """Root keeps a capability it asks for; nobody holds none, and asking for one fails."""
    # The default set keeps what it can: Podman's set for root, nothing for nobody.
    assert await ac.call_with_container(["true"], namespaces=()) == 0
    if ROOT:
        kept = await ac.call_with_container(["true"], namespaces=(), capabilities={"CAP_KILL"})
        assert kept == 0
    else:
        with pytest.raises(PermissionError, match="cannot keep CAP_KILL"):
            await ac.run_container(["true"], namespaces=(), capabilities={"CAP_KILL"})


async def test_veth_network_takes_root() -> None:
    """Root gets a veth pair; nobody is told, before anything is spawned, that it takes root."""
    if ROOT:
        container = await ac.run_container(["true"], mounts=SYSTEM, network="veth")
        async with container:
            assert container.network is not None
            assert await container.wait() == 0
    else:
        with pytest.raises(PermissionError, match="only root"):
            await ac.run_container(["true"], network="veth")


async def test_setuid_bits_are_refused_only_for_a_root_caller() -> None:
    """A root caller's files are root's on the host; an unprivileged caller's are its own.

    So the default filter refuses the setuid bit only to the first
    (tests/security/test_host_privilege.py has the attacks).
    """
    returncode, out = await run_sh(
        "cp /bin/true /tmp/t && chmod u+s /tmp/t && stat -c %A /tmp/t",
        mounts=[*SYSTEM, ac.WRITABLE_TMP],
    )
    if ROOT:
        assert returncode != 0 and "Operation not permitted" in out, out
    else:
        assert (returncode, out) == (0, "-rwsr-xr-x\n"), out


async def test_a_forged_excursion_reply_runs_nothing_in_the_caller(tmp_path: Path) -> None:
    """As root and as nobody: a reply forged inside is not unpickled as code by the caller."""
    marker = tmp_path / "pwned"
    async with await ac.run_container(["sleep", "60"], mounts=SYSTEM) as box:
        with pytest.raises(ac.UntrustedValueError):
            await ac.container_excursion_value(box, lambda: forge_reply(str(marker)))
    assert not marker.exists()


def cgroups_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as file:
        return file.read()


async def test_what_a_container_without_pid_namespace_leaves_is_ended(tmp_path: Path) -> None:
    """A setsid daemon of a container without a pid namespace: by its cgroup, or at shutdown.

    As root the fork server clones every container into a cgroup of its
    own, and stop() kills what is in it. An unprivileged caller outside a
    delegated cgroup may make none: the daemon is then adopted by the
    server (a subreaper) and killed when it shuts down (docs/security.md).
    """
    script = "setsid sleep 300 & echo $! > /out/daemon; exec sleep 300"
    mounts = [*SYSTEM, ac.FileSystemMapping(str(tmp_path), "/out", writable=True)]
    async with await ac.run_container(
        ["sh", "-c", script], mounts=mounts, namespaces=["mnt", "user"]
    ) as container:
        with anyio.fail_after(10):
            while not (tmp_path / "daemon").exists() or not (
                tmp_path / "daemon"
            ).read_text().endswith("\n"):
                await anyio.sleep(0.005)
        daemon = int((tmp_path / "daemon").read_text())
        # In a cgroup of its own, below this process's, if the server made one.
        tracked = cgroups_of(daemon) != cgroups_of(os.getpid())
        assert tracked or not ROOT, "as root, every container has a cgroup of its own"
        await container.stop(grace=0)
    if tracked:
        assert not alive(daemon)
    else:
        assert alive(daemon)
        ac.shutdown_fork_server()
        assert not alive(daemon)
