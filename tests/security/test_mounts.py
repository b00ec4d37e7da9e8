"""The container's mounts: what they are, and that nothing done with them reaches the host.

Checks /proc and /sys inside (fresh instances, with the documented flags),
that the only host file systems inside are the mappings (and the documented
device nodes), that mounting, remounting and unmounting inside never change
the host's mount table, and that symbolic links resolve inside the
container, never on the host. Tests marked xfail(strict=True) are known
gaps: each fails today, and its mark must go when the gap is closed.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import anyio
import pytest
from capture import outside_tmp_directory, sh

import asynccontainer as ac
from asynccontainer._plan.build import MASKED_PATHS

SYSTEM = ac.HOST_SYSTEM_MAPPINGS

# The device nodes docs/security.md lists, bound from the host's /dev when present.
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty", "fuse")


class Mount(NamedTuple):
    """One line of /proc/PID/mountinfo (proc(5))."""

    device: str  # major:minor
    root: str  # the path, in its file system, that is mounted
    mount_point: str
    options: frozenset[str]  # per-mount options
    fstype: str
    source: str
    super_options: frozenset[str]  # per-file-system options


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields, _, rest = line.partition(" - ")
        fields_list = fields.split()
        fstype, source, super_options = rest.split(" ", 2)
        mounts.append(
            Mount(
                device=fields_list[2],
                root=fields_list[3],
                mount_point=fields_list[4],
                options=frozenset(fields_list[5].split(",")),
                fstype=fstype,
                source=source,
                super_options=frozenset(super_options.split(",")),
            )
        )
    return mounts


def host_mounts() -> list[Mount]:
    with open("/proc/self/mountinfo") as file:
        return parse_mountinfo(file.read())


def where_on_host(path: str, mounts: list[Mount]) -> tuple[str, str]:
    """Return (device, root) that a bind mount of the host `path` shows in mountinfo."""
    best: Mount | None = None
    for mount in mounts:  # the last of equal mount points is the one on top
        prefix = mount.mount_point.rstrip("/")
        if (path == mount.mount_point or path.startswith(prefix + "/")) and (
            best is None or len(mount.mount_point) >= len(best.mount_point)
        ):
            best = mount
    assert best is not None
    rest = path[len(best.mount_point.rstrip("/")) :]
    return best.device, (best.root.rstrip("/") + rest) or "/"


async def mounts_inside(**keywords: object) -> list[Mount]:
    returncode, out = await sh("cat /proc/self/mountinfo", with_stderr=True, **keywords)
    assert returncode == 0, out
    return parse_mountinfo(out)


async def test_proc_and_sys_are_fresh_and_restricted() -> None:
    """/proc: a new procfs, nosuid,nodev,noexec; /sys: a new sysfs, read-only, nosuid,nodev,noexec.

    Guards against a host /proc or /sys reaching the container (the root of
    the "sensitive /proc and /sys writes" breakouts) and a fake /proc (CVE-2019-16884).
    """
    inside = {mount.mount_point: mount for mount in await mounts_inside()}
    host = host_mounts()

    proc = inside["/proc"]
    assert proc.fstype == "proc"
    assert {"nosuid", "nodev", "noexec"} <= proc.options
    # Its own instance (the container's pid namespace), not the host's.
    assert proc.device not in {mount.device for mount in host}

    sys_mount = inside["/sys"]
    assert sys_mount.fstype == "sysfs"
    assert {"ro", "nosuid", "nodev", "noexec"} <= sys_mount.options
    assert "ro" in sys_mount.super_options
    assert sys_mount.device not in {mount.device for mount in host}


async def test_sys_refuses_writes() -> None:
    """Writing to /sys fails with EROFS, whatever the file's permissions say.

    The container's root is the host's root here (uid 0 mapped to 0), so only
    the read-only mount stands between it and sysfs attributes of the host.
    """
    script = (
        "true >> /sys/kernel/uevent_seqnum; echo status $?; mkdir /sys/kernel/x; echo status $?; "
        "touch /sys/x; echo status $?"
    )
    _, out = await sh(script, with_stderr=True)
    statuses = [line.split()[1] for line in out.splitlines() if line.startswith("status ")]
    assert len(statuses) == 3 and "0" not in statuses, out
    assert out.count("Read-only file system") == 3, out


async def test_only_the_mappings_and_device_nodes_come_from_the_host(tmp_path: Path) -> None:
    """Every mount of a host file system inside is a mapping or a documented /dev node.

    Guards against host paths reached through extra mounts ("no file of the
    host outside the exposed mappings is reachable").
    """
    exposed = tmp_path / "exposed"
    exposed.mkdir()
    (exposed / "file").write_text("exposed\n")
    mappings = [
        *SYSTEM,
        ac.FileSystemMapping(str(exposed), "/mapped"),
        ac.FileSystemMapping(str(exposed / "file"), "/one-file"),
    ]
    host = host_mounts()
    allowed = set()
    for item in mappings:
        if isinstance(item, ac.FileSystemMapping):
            allowed.add((*where_on_host(os.path.realpath(item.source), host), item.target))
    mapped = set(allowed)
    for node in DEVICE_NODES:
        if os.path.exists(f"/dev/{node}"):
            allowed.add((*where_on_host(f"/dev/{node}", host), f"/dev/{node}"))
    # Masked files of /proc are covered with the host's /dev/null.
    for masked in MASKED_PATHS:
        allowed.add((*where_on_host("/dev/null", host), masked))

    host_devices = {mount.device for mount in host}
    from_host = {
        (mount.device, mount.root, mount.mount_point)
        for mount in await mounts_inside(mounts=mappings)
        if mount.device in host_devices
    }
    assert from_host <= allowed, from_host - allowed
    assert mapped <= from_host  # not vacuous: the mappings were seen


# --- Mounting inside leaves the host alone ---------------------------------

# Every command may fail: what matters is that none changes the host. The
# same again in a user and mount namespace of the container's own, where
# root has CAP_SYS_ADMIN over its mounts, so mounts do happen. Mapping uid 0
# into it takes CAP_SETFCAP (user_namespaces(7), since Linux 5.12), which a
# root caller's container keeps only when its set is named.
NESTING = {"CAP_SETFCAP"}
ATTEMPTS = """
mkdir -p /dev/m /shared/{n}
mount -t tmpfs none /mnt
mount -t tmpfs none /dev/m && echo mounted
mount -t tmpfs none /shared/{n} && echo mounted-on-the-shared-mapping
mount --make-shared /
mount --make-rshared /shared
mount -o remount,rw /
mount -o remount,rw,exec,suid,dev /proc
mount -o remount,rw /usr
mount -o remount,ro /shared
umount -l /shared
umount -l /sys
umount -l /proc
umount -l /usr
"""


def attempts_script(number: int) -> str:
    attempts = ATTEMPTS.format(n=number)
    return f"{{ {attempts} }} 2>/dev/null; unshare -Urm sh -c {shlex.quote(attempts)} 2>/dev/null"


def raw_mountinfo(pid: str) -> str:
    with open(f"/proc/{pid}/mountinfo") as file:
        return file.read()


@pytest.fixture
def shared_host_mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of the host's, with shared propagation, so that a leak would have a way out."""
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        yield shared
    finally:
        subprocess.run(["umount", "-R", str(shared)], check=True)


async def test_mounts_inside_never_reach_the_host(shared_host_mount: Path) -> None:
    """100 containers mount, remount, unmount, change propagation; host mountinfo stays identical.

    Guards against mount propagation out of a container (the reason every
    mount is made private first) and unmounts or remounts of host mounts.
    """
    before = raw_mountinfo("self"), raw_mountinfo("1")
    mapping = ac.FileSystemMapping(str(shared_host_mount), "/shared", writable=True)
    outputs: list[str] = []
    limiter = anyio.CapacityLimiter(4)

    async def one(number: int) -> None:
        async with limiter:
            _, out = await sh(
                attempts_script(number), mounts=[*SYSTEM, mapping], capabilities=NESTING
            )
            outputs.append(out)

    async with anyio.create_task_group() as group:
        for number in range(100):
            group.start_soon(one, number)

    assert (raw_mountinfo("self"), raw_mountinfo("1")) == before
    # The premise: mounts were made inside, on the shared mapping too.
    assert len(outputs) == 100
    assert all("mounted\n" in out for out in outputs), outputs[:3]
    assert all("mounted-on-the-shared-mapping\n" in out for out in outputs), outputs[:3]


async def test_cgroup_release_agent_cannot_be_set() -> None:
    """A cgroup v1 hierarchy mounted inside gives no writable release_agent.

    Guards against CVE-2022-0492 (release_agent written from a user namespace,
    run by the host's kernel as root).
    """
    hierarchies = ("cpu", "memory", "pids", "none,name=systemd")
    host_agents = {}
    for name in os.listdir("/sys/fs/cgroup") if os.path.isdir("/sys/fs/cgroup") else ():
        path = f"/sys/fs/cgroup/{name}/release_agent"
        if os.path.isfile(path):
            with open(path) as file:
                host_agents[path] = file.read()
    payload = f"/asynccontainer-test-{secrets.token_hex(8)}"
    inner = "\n".join(
        f"if mount -t cgroup -o {options} cgroup /dev/cg 2>/dev/null; then\n"
        "    if [ -f /dev/cg/release_agent ]; then\n"
        f"        echo found; echo {payload} > /dev/cg/release_agent; cat /dev/cg/release_agent\n"
        "    fi\n"
        "    umount /dev/cg\n"
        "fi"
        for options in hierarchies
    )
    script = f"mkdir /dev/cg; unshare -UrmC sh -c {shlex.quote(inner)}"
    try:
        _, out = await sh(script, with_stderr=True, capabilities=NESTING)
    finally:
        for path, content in host_agents.items():
            with open(path) as file:
                changed = file.read() != content
            if changed:  # put the host back before failing below
                with open(path, "w") as file:
                    file.write(content.strip() or "\n")
    assert payload not in out, out
    if "found" not in out:
        pytest.skip("no cgroup v1 hierarchy with a release_agent can be mounted here")
    for path, content in host_agents.items():
        with open(path) as file:
            assert file.read() == content


# --- Symbolic links resolve inside ------------------------------------------


class Secret:
    def __init__(self, base: Path) -> None:
        self.token = secrets.token_hex(16)
        self.directory = base / "hidden"
        self.directory.mkdir()
        self.path = self.directory / "secret"
        self.path.write_text(f"secret-{self.token}\n")


def populate_link(target: str) -> object:
    def populate() -> None:
        os.symlink(target, "/link")

    return populate


@pytest.mark.parametrize("mapped", [False, True], ids=["unmapped", "control-mapped"])
@pytest.mark.parametrize("how", ["ln -s in a writable root", "populate", "Symlink", "planted"])
async def test_symbolic_links_resolve_inside(tmp_path: Path, how: str, mapped: bool) -> None:
    """A link inside to the absolute host path of a secret reads nothing of the host.

    Guards against links resolved on the host (Kubernetes' subPath symlink
    escape, CVE-2017-1002101). The control maps the secret's directory at its
    host path: the same link then reads it.
    """
    secret = Secret(tmp_path)
    target = str(secret.path)
    mounts: list[ac.MountItem] = [*SYSTEM]
    keywords: dict[str, object] = {}
    link = "/link"
    if how == "ln -s in a writable root":
        script = f"ln -s {shlex.quote(target)} /link && cat /link"
        keywords["writable_root"] = True
    else:
        script = "cat /link"
        if how == "populate":
            keywords["populate"] = populate_link(target)
        elif how == "Symlink":
            mounts.append(ac.Symlink("/link", target))
        else:  # planted on the host in a directory mapped writable, as a container could
            planted = tmp_path / "data"
            planted.mkdir()
            (planted / "link").symlink_to(target)
            mounts.append(ac.FileSystemMapping(str(planted), "/data", writable=True))
            link = "/data/link"
            script = "cat /data/link"
    if mapped:
        mounts.append(ac.FileSystemMapping(str(secret.directory)))
    _, out = await sh(f"{script}; readlink {link}", mounts=mounts, with_stderr=True, **keywords)
    assert target in out  # the link is there, naming the host path
    if mapped:
        assert secret.token in out, out
    else:
        assert secret.token not in out, out
        assert "No such file or directory" in out, out


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A host directory outside /tmp, which the set-up does not cover with the new root."""
    with outside_tmp_directory() as directory:
        yield directory


async def test_a_link_in_a_mapping_does_not_redirect_a_nested_mapping(
    tmp_path: Path, outside_tmp: Path
) -> None:
    """A link planted in a writable mapping never makes the set-up write on the host.

    Guards against mount targets resolved through container-controlled links,
    on the host (CVE-2017-1002101, and runc's CVE-2021-30465 without the race).
    """
    data = tmp_path / "data"
    data.mkdir()
    (data / "sub").symlink_to(outside_tmp)  # written by an earlier container, say
    exposed = tmp_path / "exposed"
    exposed.write_text("exposed\n")
    mounts = [
        *SYSTEM,
        ac.FileSystemMapping(str(data), "/data", writable=True),
        ac.FileSystemMapping(str(exposed), "/data/sub/new/file"),
    ]
    try:
        await sh("true", mounts=mounts)
    except OSError:
        pass  # refusing the mapping is fine too
    assert list(outside_tmp.iterdir()) == []
