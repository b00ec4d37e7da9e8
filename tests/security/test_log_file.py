"""A service's log file gives its user nothing: no chown, no chmod, no creation through a link.

The log file is prepared by the caller, as root for a root caller, in a
directory the service's user may be able to write. It once followed
symbolic links and then chowned and chmodded whatever it found: a link to
any root file gave that file to the service's user; a dangling link made
root create its target; log_file="/dev/null" turned the host's /dev/null
into mode 0640; and the link was mapped writable into the container. Now
the file is opened without following a link, only a regular file (or a
character device, written to and left alone) is accepted, a new file is
created with O_EXCL and only then given to the user, and a file that
existed is never chmodded or chowned.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import anyio
import pytest

import asynccontainer as ac

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the threat is root's chown")
NOBODY = 65534


async def run_service(log: Path, command: str = "echo hello", **keywords: object) -> int:
    spec = ac.ServiceSpec(["sh", "-c", command], log_file=str(log), user="nobody", **keywords)  # type: ignore[arg-type]
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        with anyio.fail_after(15):
            return await service.wait()


@pytest.fixture
def root_file(tmp_path: Path) -> Path:
    """A file of root's, as /etc/shadow would be."""
    path = tmp_path / "secret"
    path.write_text("root's secret\n")
    path.chmod(0o600)
    return path


async def test_a_link_to_a_root_file_is_refused_and_the_file_untouched(
    tmp_path: Path, root_file: Path
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log = log_dir / "service.log"
    log.symlink_to(root_file)  # planted by the service's user
    before = root_file.stat()
    with pytest.raises(OSError, match="symbolic link") as info:
        await run_service(log)
    assert info.value.filename == str(log)
    after = root_file.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert root_file.read_text() == "root's secret\n"


async def test_a_dangling_link_does_not_make_root_create_its_target(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    target = tmp_path / "created-by-root"
    log.symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        await run_service(log)
    assert not target.exists()


async def test_dev_null_is_written_to_and_left_alone() -> None:
    before = os.stat("/dev/null")
    assert await run_service(Path("/dev/null")) == 0
    after = os.stat("/dev/null")
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )
    assert stat.S_IMODE(after.st_mode) == 0o666


async def test_an_existing_file_is_neither_chmodded_nor_chowned(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("earlier\n")
    log.chmod(0o600)
    assert await run_service(log) == 0
    status = log.stat()
    assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (0, 0o600)
    assert log.read_text().startswith("earlier\n") and log.read_text().endswith(" hello\n")


async def test_a_new_file_is_created_for_the_user(tmp_path: Path) -> None:
    log = tmp_path / "new" / "service.log"
    assert await run_service(log) == 0
    status = log.stat()
    assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (NOBODY, 0o640)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
async def test_what_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    log = tmp_path / "service.log"
    if kind == "fifo":
        os.mkfifo(log)
    else:
        log.mkdir()
    with anyio.fail_after(10), pytest.raises(OSError, match="regular file"):
        await run_service(log)


async def test_a_link_swapped_in_after_the_start_is_not_mapped(
    tmp_path: Path, root_file: Path
) -> None:
    """Respawned, the service must not get a link its user put in place of the log mapped in."""
    log = tmp_path / "service.log"
    # The swap happens on the host, as the service's user would do it there.
    spec = ac.ServiceSpec(["sh", "-c", "echo run; exec sleep 30"], log_file=str(log), user="nobody")
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        log.unlink()
        log.symlink_to(root_file)
        await service.stop()
        with pytest.raises(OSError, match="symbolic link"):
            await group.start(spec)
    assert root_file.stat().st_uid == 0 and root_file.read_text() == "root's secret\n"
