"""The target keeps only the capabilities asked for, in all five sets.

Guards against the class of escapes and kernel exploits that need a
capability a container had no use for: mounts and namespaces with
CAP_SYS_ADMIN (CVE-2022-0492, cgroup release_agent; CVE-2022-0185, the
fsconfig heap overflow reached as root of a user namespace), raw packet
sockets with CAP_NET_RAW (CVE-2020-14386, AF_PACKET memory corruption).
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from capture import sh

import asynccontainer as ac
from asynccontainer._spec.capabilities import capability_numbers

STATUS = "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status"
NO_USER = ["mnt", "pid", "ipc", "uts", "net"]


def mask(names: object) -> int:
    return sum(1 << number for number in capability_numbers(names))  # type: ignore[arg-type]


def sets(out: str) -> dict[str, int]:
    """Parse the Cap* lines of /proc/self/status into {"CapEff": mask, ...}."""
    result = {}
    for line in out.splitlines():
        if line.startswith("Cap"):
            name, value = line.split(":")
            result[name] = int(value, 16)
    return result


# What a root caller's container keeps of the default set: without the two
# capabilities that would let a file in a writable mapping grant privilege
# on the host (docs/security.md).
HOST_PRIVILEGE = {"CAP_SETFCAP", "CAP_FSETID"}
DEFAULT = ac.DEFAULT_CAPABILITIES - HOST_PRIVILEGE if os.geteuid() == 0 else ac.DEFAULT_CAPABILITIES


async def test_default_set_in_all_five_sets() -> None:
    """Root of the user namespace keeps Podman's set, bounding and ambient included."""
    returncode, out = await sh(STATUS)
    assert returncode == 0
    default = mask(DEFAULT)
    assert sets(out) == dict.fromkeys(["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"], default)
    assert not default & mask({"CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE"})


async def test_host_root_without_user_namespace_loses_the_rest() -> None:
    """Without a user namespace the caller's real capabilities are dropped too."""
    returncode, out = await sh(STATUS, namespaces=NO_USER)
    assert returncode == 0
    assert sets(out)["CapEff"] == sets(out)["CapBnd"] == mask(DEFAULT)


async def test_a_set_of_ones_own_keeps_cap_setfcap() -> None:
    """The drop is a rule of the default set only: a set that names CAP_SETFCAP keeps it."""
    returncode, out = await sh(STATUS, capabilities={"CAP_SETFCAP", "CAP_KILL"})
    assert returncode == 0
    assert sets(out)["CapEff"] == mask({"CAP_SETFCAP", "CAP_KILL"})


async def test_mount_denied_by_default_allowed_with_cap_sys_admin() -> None:
    """Without CAP_SYS_ADMIN no mount can be made; the control run keeps it and mounts."""
    script = "mount -t tmpfs none /mnt 2>/dev/null && echo mounted || echo denied"
    mounts = [*ac.HOST_SYSTEM_MAPPINGS, ac.FileSystem("none", "/mnt", "tmpfs")]
    assert await sh(script, mounts=mounts) == (0, "denied\n")
    kept = await sh(script, mounts=mounts, capabilities={"CAP_SYS_ADMIN"})
    assert kept == (0, "mounted\n")


async def test_dropped_capability_cannot_come_back_through_exec() -> None:
    """A capability out of the bounding set stays out, even for a setuid-root file.

    no_new_privs is off here, so only the bounding set stands in the way.
    """
    script = f"setpriv --inh-caps=+sys_admin true 2>/dev/null; echo $?; {STATUS}"
    returncode, out = await sh(script, no_new_privs=False, seccomp=None)
    assert returncode == 0
    assert out.splitlines()[0] != "0"
    assert not sets(out)["CapPrm"] & mask({"CAP_SYS_ADMIN"})


async def test_explicit_set_is_exact() -> None:
    returncode, out = await sh(STATUS, capabilities={"net_bind_service", "CAP_KILL"})
    assert returncode == 0
    wanted = mask({"CAP_NET_BIND_SERVICE", "CAP_KILL"})
    assert set(sets(out).values()) == {wanted}


async def test_none_and_all_keep_everything() -> None:
    for capabilities in (None, ac.ALL_CAPABILITIES):
        returncode, out = await sh(STATUS, capabilities=capabilities)
        assert returncode == 0
        assert sets(out)["CapEff"] & mask({"CAP_SYS_ADMIN", "CAP_NET_ADMIN"})


async def test_service_user_keeps_its_capability_across_setuid_and_exec(tmp_path: Path) -> None:
    """A service running as nobody keeps exactly CAP_NET_BIND_SERVICE, and binds port 80."""
    log = tmp_path / "service.log"
    bind = "python3 -c \"import socket; socket.socket().bind(('127.0.0.1', 80)); print('bound')\""
    spec = ac.ServiceSpec(
        ["sh", "-c", f"id -u; {STATUS}; {bind}"],
        namespaces=[*ac.default_namespaces(), "net"],
        log_file=str(log),
        user="nobody",
        capabilities={"CAP_NET_BIND_SERVICE"},
    )
    with anyio.fail_after(15):
        async with ac.ServiceGroup() as group:
            service = await group.start(spec)
            assert await service.wait() == 0
    lines = [line[20:] for line in log.read_text().splitlines()]
    assert lines[0] == "65534"
    capabilities = sets("\n".join(lines[1:6]))
    assert set(capabilities.values()) == {mask({"CAP_NET_BIND_SERVICE"})}
    assert lines[6] == "bound"


async def test_bad_names_fail_before_anything_is_spawned() -> None:
    with pytest.raises(ValueError, match="did you mean 'CAP_SYS_ADMIN'"):
        await ac.run_container(["true"], capabilities={"CAP_SYS_ADMN"})
    with pytest.raises(TypeError, match="not the string"):
        await ac.run_container(["true"], capabilities="CAP_KILL")
    with pytest.raises(TypeError, match="names like"):
        await ac.run_container(["true"], capabilities={21})
    with pytest.raises(ValueError, match="unknown capability"):
        ac.ServiceSpec(["true"], capabilities={"CAP_NOPE"})


def test_service_capabilities_from_an_iterator_are_kept() -> None:
    """An iterator is read once: the check must not leave the spec with no names.

    Names are kept in their canonical spelling, so that equal sets compare equal.
    """
    spec = ac.ServiceSpec(["true"], capabilities=iter(["CAP_KILL", "net_bind_service"]))
    assert spec.capabilities == frozenset({"CAP_KILL", "CAP_NET_BIND_SERVICE"})


# EPERM without CAP_SETUID; EINVAL where uid 0 is not even mapped.
SETUID_BACK = (
    "python3 -c \"import os\ntry:\n    os.setuid(0)\n    print('became root')\n"
    "except OSError:\n    print('refused')\""
)


async def test_a_service_user_keeps_no_capability_by_default(tmp_path: Path) -> None:
    """user='nobody' once kept the default set as ambient capabilities: setuid(0) worked."""
    log = tmp_path / "service.log"
    spec = ac.ServiceSpec(
        ["sh", "-c", f"{STATUS}; {SETUID_BACK}"], log_file=str(log), user="nobody"
    )
    with anyio.fail_after(15):
        async with ac.ServiceGroup() as group:
            service = await group.start(spec)
            assert await service.wait() == 0
    lines = [line[20:] for line in log.read_text().splitlines()]
    capabilities = sets("\n".join(lines[:5]))
    assert capabilities["CapPrm"] == capabilities["CapEff"] == capabilities["CapAmb"] == 0
    assert capabilities["CapInh"] == 0  # CVE-2022-29162: no inheritable set either
    assert lines[5] == "refused"


async def test_a_guest_uid_keeps_no_capability_by_default() -> None:
    returncode, out = await sh(f"id -u; {STATUS}; {SETUID_BACK}", guest_uid=1000)
    assert returncode == 0, out
    lines = out.splitlines()
    assert lines[0] == "1000"
    capabilities = sets("\n".join(lines[1:6]))
    assert capabilities["CapPrm"] == capabilities["CapEff"] == capabilities["CapAmb"] == 0
    assert lines[6] == "refused"
    # Named, a capability is kept whatever the uid.
    returncode, out = await sh(STATUS, guest_uid=1000, capabilities={"CAP_KILL"})
    assert sets(out)["CapEff"] == mask({"CAP_KILL"})
