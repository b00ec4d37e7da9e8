"""A root caller's container leaves no file on the host that grants privilege there.

Its files in a writable mapping are root's on the host (its uid 0 is the
host's uid 0): a setuid-root program, or one with file capabilities, left
there would make any host user who runs it root. The default seccomp
filter refuses the setuid and setgid bits to chmod and its kin, open,
creat and mknod (and turns off openat2 and io_uring, which it cannot
inspect), and the default capabilities lose CAP_SETFCAP and CAP_FSETID for
a root caller. Each attack below is tried, then the host's files are
inspected; the control without the filter and with every capability shows
that the same attacks work there (so the checks can fail).

(The same rules for an unprivileged caller, whose files are its own, are in
tests/unprivileged: there the bits are harmless, and allowed.)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import anyio
import pytest
from capture import sh

import asynccontainer as ac

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the threat is a root caller's")

ATTACKS = """
cd /data
cp /bin/true a; chmod u+s a
cp /bin/true b; chmod g+s b
cp /bin/true c; chmod 6755 c
install -m 4755 /bin/true d
python3 -c 'import os; os.close(os.open("e", os.O_CREAT | os.O_WRONLY, 0o4755))'
python3 -c 'import os; os.mknod("f", 0o104755)'
python3 -c 'import os; fd = os.open("g", os.O_CREAT | os.O_WRONLY, 0o755); os.fchmod(fd, 0o4755)'
cp /bin/true h; python3 -c "$SETCAP" h
cp /bin/true i; python3 -c 'import os; os.chmod("i", 0o2755, follow_symlinks=True)'
ls -l /data
"""


# setcap(8) without libcap: a version 2 security.capability (<linux/capability.h>
# VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE) granting CAP_SETUID (bit 7).
SETCAP = (
    "import os, struct, sys; "
    "blob = struct.pack('<5I', 0x02000001, 1 << 7, 0, 0, 0); "
    "os.setxattr(sys.argv[1], 'security.capability', blob)"
)


def privileged_files(directory: Path) -> list[str]:
    """The files of `directory` that are setuid, setgid or carry file capabilities."""
    found = []
    for path in sorted(directory.iterdir()):
        mode = path.lstat().st_mode
        if mode & (stat.S_ISUID | stat.S_ISGID):
            found.append(f"{path.name}: mode {stat.filemode(mode)}")
        try:
            os.getxattr(path, "security.capability", follow_symlinks=False)
            found.append(f"{path.name}: file capabilities")
        except OSError:
            pass
    return found


def mounts_for(directory: Path) -> list[ac.MountItem]:
    return [*ac.HOST_SYSTEM_MAPPINGS, ac.FileSystemMapping(str(directory), "/data", writable=True)]


@pytest.mark.parametrize(
    "keywords",
    [{}, {"guest_uid": 1000}, {"namespaces": [n for n in ac.NAMESPACES if n != "user"]}],
    ids=["default", "guest-uid", "no-user-namespace"],
)
async def test_no_privileged_file_is_left_in_a_writable_mapping(
    tmp_path: Path, keywords: dict[str, object]
) -> None:
    _, out = await sh(
        ATTACKS, mounts=mounts_for(tmp_path), with_stderr=True, env={"SETCAP": SETCAP}, **keywords
    )
    # e and f are refused outright (created with the bit); the others exist.
    assert {p.name for p in tmp_path.iterdir()} == set("abcdghi"), out
    assert privileged_files(tmp_path) == [], out
    assert "Operation not permitted" in out


async def test_a_service_leaves_none_either(tmp_path: Path) -> None:
    """A service is root without a user namespace: the same rules hold."""
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "log"
    spec = ac.ServiceSpec(
        ["sh", "-c", ATTACKS],
        mappings=[ac.FileSystemMapping(str(data), "/data", writable=True)],
        log_file=str(log),
        environment={"SETCAP": SETCAP, "PATH": "/usr/bin:/bin"},
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        with anyio.fail_after(20):
            await service.wait()
    assert {p.name for p in data.iterdir()} == set("abcdghi"), log.read_text()
    assert privileged_files(data) == [], log.read_text()


async def test_the_control_without_the_filter_and_with_every_capability(tmp_path: Path) -> None:
    """The attacks do work when the protections are turned off: the check above can fail."""
    _, out = await sh(
        ATTACKS,
        mounts=mounts_for(tmp_path),
        with_stderr=True,
        env={"SETCAP": SETCAP},
        seccomp=ac.SeccompPolicy(deny_setuid_files=False),
        capabilities=None,
    )
    found = privileged_files(tmp_path)
    assert {line.split(":")[0] for line in found} == set("abcdefghi"), (found, out)


async def test_the_filter_alone_refuses_the_bits(tmp_path: Path) -> None:
    """With every capability but the default filter, no setuid or setgid bit is set."""
    _, out = await sh(
        ATTACKS,
        mounts=mounts_for(tmp_path),
        with_stderr=True,
        env={"SETCAP": SETCAP},
        capabilities=None,
    )
    assert [line for line in privileged_files(tmp_path) if "mode" in line] == [], out


async def test_the_capabilities_alone_refuse_file_capabilities(tmp_path: Path) -> None:
    """Without the filter, the default set still cannot set file capabilities."""
    _, out = await sh(
        ATTACKS,
        mounts=mounts_for(tmp_path),
        with_stderr=True,
        env={"SETCAP": SETCAP},
        seccomp=ac.SeccompPolicy(deny_setuid_files=False),
    )
    assert "h: file capabilities" not in privileged_files(tmp_path), out


async def test_the_network_files_are_mapped_read_only(tmp_path: Path) -> None:
    """Guix maps resolv.conf writable: a root caller's container could rewrite the host's DNS."""
    with open("/etc/resolv.conf", "rb") as file:
        before = file.read()
    mounts = [*ac.HOST_SYSTEM_MAPPINGS, *ac.NETWORK_FILE_MAPPINGS]
    _, out = await sh(
        "echo 'nameserver 192.0.2.1' >> /etc/resolv.conf && echo written",
        mounts=mounts,
        with_stderr=True,
        namespaces=[n for n in ac.NAMESPACES if n != "net"],
    )
    assert "Read-only file system" in out and "written" not in out, out
    with open("/etc/resolv.conf", "rb") as file:
        assert file.read() == before
    assert all(not mapping.writable for mapping in ac.NETWORK_FILE_MAPPINGS)
