"""No new privileges inside a container: setuid programs grant nothing.

Guards against the privilege-escalation class where a process inside a
container runs a setuid-root program (its own, or the host's) to regain
the privileges the container was meant to shed, as in CVE-2019-5736-style
breakouts that start from root inside, and in setuid helpers' bugs
(CVE-2021-4034, pkexec) reachable from a container.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from capture import output_of

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


def setuid_id(directory: Path) -> Path:
    """A copy of id(1), owned by root, with the setuid bit: prints the effective uid."""
    directory.chmod(0o755)  # nobody must be able to enter it
    program = directory / "id"
    shutil.copy(shutil.which("id") or "/usr/bin/id", program)
    os.chown(program, 0, 0)
    program.chmod(0o755 | stat.S_ISUID)
    return program


async def euid_of_setuid_program(tmp_path: Path, **keywords: object) -> str:
    setuid_id(tmp_path)
    # As root without a user namespace, drop to nobody with setpriv, then
    # run the setuid-root copy of id: only no_new_privs stands in its way.
    returncode, out = await output_of(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/x/id", "-u"],
        namespaces=["mnt", "pid"],
        mounts=[*SYSTEM, ac.FileSystemMapping(str(tmp_path), "/x")],
        **keywords,
    )
    assert returncode == 0, out
    return out.strip()


async def test_setuid_program_does_not_raise_privileges(tmp_path: Path) -> None:
    """With the default no_new_privs=True the setuid bit is ignored: euid stays 65534."""
    assert await euid_of_setuid_program(tmp_path) == "65534"


async def test_without_no_new_privs_the_setuid_bit_works(tmp_path: Path) -> None:
    """The control: the same program grants root when no_new_privs=False.

    So the test above cannot pass for another reason (a nosuid mount, say).
    """
    assert await euid_of_setuid_program(tmp_path, no_new_privs=False) == "0"


async def test_no_new_privs_is_set_in_the_target() -> None:
    def flag() -> None:
        from asynccontainer import _kernel

        raise SystemExit(_kernel.prctl(_kernel.PR_GET_NO_NEW_PRIVS))

    assert await ac.call_with_container(flag) == 1
    assert await ac.call_with_container(flag, no_new_privs=False) == 0


async def test_services_have_no_new_privs(tmp_path: Path) -> None:
    setuid_id(tmp_path)
    log = tmp_path / "log"
    async with ac.ServiceGroup() as group:
        service = await group.start(
            ac.ServiceSpec(
                ["/x/id", "-u"],
                user="nobody",
                namespaces=["mnt", "pid"],
                mappings=[ac.FileSystemMapping(str(tmp_path), "/x")],
                log_file=str(log),
            )
        )
        assert await service.wait() == 0
    assert log.read_text().split()[-1] == "65534"
