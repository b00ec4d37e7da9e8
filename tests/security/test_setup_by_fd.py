"""The set-up follows no path the container controls: every mount target is opened beneath the root.

A symbolic link planted in a writable mapping (by this container or an
earlier one), or made by a `Symlink` item, resolves inside the container's
root during the set-up, as it would for the container itself: a nested
mapping never lands on the host, and the set-up never creates anything
there (runc's CVE-2021-30465, Kubernetes' CVE-2017-1002101, the cases of
nsjail's tests/mount_destination_confinement.sh). Host sources are opened
before anything is mounted, so the staging of the new root shows through
no mapping.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from capture import outside_tmp_directory, sh

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


@pytest.fixture
def outside() -> Iterator[Path]:
    """A host directory outside /tmp that no container should ever write to."""
    with outside_tmp_directory() as directory:
        yield directory


@pytest.fixture
def exposed(tmp_path: Path) -> Path:
    path = tmp_path / "exposed"
    path.write_text("exposed\n")
    return path


@pytest.mark.parametrize("relative", [False, True], ids=["absolute-link", "relative-link"])
async def test_a_link_in_a_writable_mapping_resolves_inside(
    tmp_path: Path, outside: Path, exposed: Path, relative: bool
) -> None:
    """data/sub -> a host directory: the nested mapping lands in the container, or is refused."""
    data = tmp_path / "data"
    data.mkdir()
    # Where the link leads inside the container: its writable /tmp. The
    # relative one climbs past the root, which holds it.
    target = "../../../../tmp" if relative else "/tmp"
    (data / "sub").symlink_to(target)
    mounts = [
        *SYSTEM,
        ac.WRITABLE_TMP,
        ac.FileSystemMapping(str(data), "/data", writable=True),
        ac.FileSystemMapping(str(exposed), "/data/sub/new/file"),
    ]
    returncode, out = await sh("cat /tmp/new/file", mounts=mounts)
    # The link was followed inside the root, to the container's own /tmp.
    assert (returncode, out) == (0, "exposed\n")
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in data.iterdir()) == ["sub"]


async def test_a_dangling_link_in_the_way_is_refused_naming_it(
    tmp_path: Path, outside: Path, exposed: Path
) -> None:
    """A link to a host path the container lacks is not created through: ELOOP, nothing made."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "sub").symlink_to(outside)  # exists on the host, not in the container
    mounts = [
        *SYSTEM,
        ac.FileSystemMapping(str(data), "/data", writable=True),
        ac.FileSystemMapping(str(exposed), "/data/sub/new/file"),
    ]
    with pytest.raises(OSError) as info:
        await ac.run_container(["true"], mounts=mounts)
    assert info.value.errno == errno.ELOOP
    assert info.value.filename == "/data/sub/new/file"
    assert "step" in "\n".join(info.value.__notes__)
    assert list(outside.iterdir()) == []


async def test_a_symlink_item_then_a_nested_mapping_stays_inside(exposed: Path) -> None:
    """Symlink('/link', '/tmp') then a mapping under /link: it lands in the container's /tmp."""
    name = f"new-{os.getpid()}-{id(exposed)}"
    mounts = [
        *SYSTEM,
        ac.WRITABLE_TMP,
        ac.Symlink("/link", "/tmp"),
        ac.FileSystemMapping(str(exposed), f"/link/{name}/file"),
    ]
    returncode, out = await sh(f"cat /tmp/{name}/file", mounts=mounts)
    assert (returncode, out) == (0, "exposed\n")
    assert not os.path.exists(f"/tmp/{name}")


async def test_a_symlink_item_to_a_host_path_creates_nothing_there(
    outside: Path, exposed: Path
) -> None:
    """Symlink('/link', HOST_DIR), HOST_DIR missing inside: refused, and HOST_DIR stays empty."""
    mounts = [
        *SYSTEM,
        ac.Symlink("/link", str(outside)),
        ac.FileSystemMapping(str(exposed), "/link/new/file"),
    ]
    with pytest.raises(OSError) as info:
        await ac.run_container(["true"], mounts=mounts)
    assert info.value.errno == errno.ELOOP
    assert list(outside.iterdir()) == []


async def test_a_link_to_the_root_of_the_host_stays_inside(outside: Path, exposed: Path) -> None:
    """Symlink('/up', '../../../..') climbs no higher than the container's root."""
    mounts = [
        *SYSTEM,
        ac.Symlink("/deep/er/up", "../../../../.."),
        ac.FileSystemMapping(str(exposed), f"/deep/er/up{outside}/file"),
    ]
    returncode, out = await sh(f"cat {outside}/file", mounts=mounts)
    assert (returncode, out) == (0, "exposed\n")
    assert list(outside.iterdir()) == []


async def test_a_mapping_of_the_hosts_tmp_shows_the_hosts_tmp(tmp_path: Path) -> None:
    """--share /tmp=/hosttmp once showed the container's own root there (the staging place)."""
    marker = tmp_path / "marker"
    marker.write_text("host tmp\n")
    inside = "/hosttmp/" + str(marker.relative_to("/tmp"))
    _, out = await sh(
        f"cat {inside}; touch /hosttmp/x 2>&1 | grep -c 'Read-only'",
        mounts=[*SYSTEM, ac.FileSystemMapping("/tmp", "/hosttmp")],
        with_stderr=True,
    )
    assert out == "host tmp\n1\n", out
    assert not os.path.exists("/tmp/x")


async def test_a_mapping_of_the_hosts_root_shows_the_hosts_tmp(tmp_path: Path) -> None:
    """--expose /=/host showed the wrong thing at /host/tmp."""
    marker = tmp_path / "marker"
    marker.write_text("host tmp\n")
    returncode, out = await sh(
        f"cat /host{marker}",
        mounts=[*SYSTEM, ac.FileSystemMapping("/", "/host")],
    )
    assert (returncode, out) == (0, "host tmp\n")


async def test_a_read_only_mapping_is_read_only_below_too(tmp_path: Path) -> None:
    """The mapping of a tree with mounts in it is read-only all the way down (recursive)."""
    _, out = await sh(
        "touch /host/dev/shm/asynccontainer-test 2>&1 | grep -c 'Read-only'; "
        "ls /host/proc/self/ >/dev/null && echo proc-visible",
        mounts=[*SYSTEM, ac.FileSystemMapping("/", "/host")],
        with_stderr=True,
    )
    assert out == "1\nproc-visible\n", out
    assert not os.path.exists("/dev/shm/asynccontainer-test")


async def test_an_error_names_the_mount_point_as_the_user_wrote_it(tmp_path: Path) -> None:
    """A file mapped where a directory is: the error names "/usr", not a staging path."""
    with pytest.raises(OSError) as info:
        await ac.run_container(
            ["true"], mounts=[*SYSTEM, ac.FileSystemMapping(str(tmp_path / "missing"), "/usr/x")]
        )
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.filename == str(tmp_path / "missing")
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(OSError) as info:
        await ac.run_container(["true"], mounts=[*SYSTEM, ac.FileSystemMapping(str(file), "/usr")])
    assert info.value.errno in (errno.ENOTDIR, errno.EISDIR), info.value
    assert info.value.filename == "/usr"


# renameat2(2) flags, <linux/fs.h>
RENAME_EXCHANGE = 2


def swap_forever(directory: Path, link: Path, stop: threading.Event) -> int:
    """Exchange a directory and a symbolic link, atomically, as fast as possible."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    libc.renameat2.argtypes += [ctypes.c_uint]
    swaps = 0
    while not stop.is_set():
        if libc.renameat2(-100, bytes(directory), -100, bytes(link), RENAME_EXCHANGE) == 0:
            swaps += 1
    return swaps


@pytest.mark.timeout(300)
async def test_a_symlink_exchange_racer_never_lands_a_mount_outside(
    tmp_path: Path, outside: Path, exposed: Path
) -> None:
    """1000 starts while a host process swaps a directory of a writable mapping with a link.

    runc's CVE-2021-30465: its set-up checked a mount target, then mounted
    on the path, and a link swapped in between sent the mount anywhere.
    Here a target is opened beneath the root and mounted by fd: whatever
    the racer does, nothing is created or mounted in the outside directory
    (a start may fail, with ELOOP, when the link is in place).
    """
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "swap").symlink_to(outside)  # exchanged with data/sub, back and forth
    mounts = [
        *SYSTEM,
        ac.FileSystemMapping(str(data), "/data", writable=True),
        ac.FileSystemMapping(str(exposed), "/data/sub/file"),
    ]
    before = mount_points()
    stop = threading.Event()
    outcomes: collections.Counter[str] = collections.Counter()
    async with anyio.create_task_group() as group:
        group.start_soon(anyio.to_thread.run_sync, swap_forever, data / "sub", data / "swap", stop)
        try:
            limiter = anyio.CapacityLimiter(8)

            async def start() -> None:
                async with limiter:
                    try:
                        status = await ac.call_with_container(["true"], mounts=mounts)
                        outcomes["started" if status == 0 else f"status {status}"] += 1
                    except OSError as exc:
                        outcomes[errno.errorcode.get(exc.errno or 0, "?")] += 1

            async with anyio.create_task_group() as starters:
                for _ in range(1000):
                    starters.start_soon(start)
        finally:
            stop.set()
    assert list(outside.iterdir()) == [], outcomes
    assert mount_points() == before
    assert sum(outcomes.values()) == 1000
    assert set(outcomes) <= {"started", "ELOOP", "ENOENT", "ENOTDIR"}, outcomes
    assert outcomes["started"] > 0, outcomes


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as file:
        return sorted(line.split()[4] for line in file)
