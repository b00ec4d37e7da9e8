"""The host's global knobs under /proc and /sys are out of reach of every container.

A root caller's container is root on the host as far as procfs's uid
checks go (its uid 0 is the host's uid 0), so only the mounts stand
between it and /proc/sys (kernel.core_pattern alone gives full host root),
/proc/sysrq-trigger and the like. The set-up makes runc's and Docker's
read-only paths read-only and covers their masked paths; the lock of the
mounts (or the missing CAP_SYS_ADMIN of a service) keeps them so. Each
test writes a harmless sysctl and checks the host's value after.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import anyio
import pytest
from capture import output_of, sh

import asynccontainer as ac

SYSCTL = "/proc/sys/fs/lease-break-time"


@pytest.fixture
def host_sysctl() -> Iterator[str]:
    """The current value of a harmless host-wide sysctl; put back if a test changed it."""
    with open(SYSCTL) as file:
        before = file.read()
    yield before.strip()
    with open(SYSCTL) as file:
        after = file.read()
    if after != before:
        with open(SYSCTL, "w") as file:
            file.write(before)
        pytest.fail(f"a container changed the host's {SYSCTL} from {before!r} to {after!r}")


def other_value(value: str) -> str:
    return str(int(value) + 7)


WRITE = "echo {value} > " + SYSCTL + " && echo written || echo refused"


@pytest.mark.skipif(os.geteuid() != 0, reason="the threat is a root caller's container")
async def test_a_default_container_cannot_write_a_host_sysctl(host_sysctl: str) -> None:
    _, out = await sh(WRITE.format(value=other_value(host_sysctl)), with_stderr=True)
    assert "refused" in out and "Read-only file system" in out, out


async def test_a_default_service_cannot_write_a_host_sysctl(host_sysctl: str, tmp_path) -> None:
    """A service has no user namespace by default: its root is the host's root, for real."""
    log = tmp_path / "log"
    spec = ac.ServiceSpec(
        ["sh", "-c", WRITE.format(value=other_value(host_sysctl))], log_file=str(log)
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        with anyio.fail_after(10):
            await service.wait()
    assert "refused" in log.read_text(), log.read_text()


UNDO = (
    "umount /proc/sys 2>/dev/null && echo unmounted; "
    "umount -l /proc/keys 2>/dev/null && echo unmasked; "
    "mount -o remount,bind,rw /proc/sys 2>/dev/null && echo remounted; "
    "echo {value} > " + SYSCTL + " 2>/dev/null && echo written; echo done"
)


@pytest.mark.parametrize(
    "keywords",
    [
        {},  # locked mounts
        {"capabilities": None},  # every capability of its user namespace, still locked
        {"namespaces": [n for n in ac.NAMESPACES if n != "user"]},  # no CAP_SYS_ADMIN
    ],
    ids=["default", "all-capabilities", "no-user-namespace"],
)
async def test_the_masks_cannot_be_undone(host_sysctl: str, keywords: dict[str, object]) -> None:
    _, out = await sh(UNDO.format(value=other_value(host_sysctl)), **keywords)
    assert out == "done\n", out


async def test_without_the_lock_the_container_can_undo_them(host_sysctl: str) -> None:
    """The control: with CAP_SYS_ADMIN kept, lock_mounts=False lets the container remove a mask.

    (docs/security.md says so: the masks hold while the container lacks
    CAP_SYS_ADMIN or its mounts are locked.)
    """
    _, out = await sh("umount -l /proc/keys && echo unmasked", lock_mounts=False, capabilities=None)
    assert out == "unmasked\n"


@pytest.mark.parametrize("path", ["/proc/keys", "/proc/timer_list", "/proc/interrupts"])
async def test_masked_files_read_empty(path: str) -> None:
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing on this host: pick a masked path it has")
    with open(path) as file:
        assert file.read(), f"the host's {path} is empty: the test would prove nothing"
    returncode, out = await sh(f"cat {path}; echo end")
    assert (returncode, out) == (0, "end\n")


@pytest.mark.parametrize("path", ["/sys/firmware"])
async def test_masked_directories_are_empty_and_read_only(path: str) -> None:
    assert os.listdir(path), f"the host's {path} is empty: the test would prove nothing"
    _, out = await sh(f"ls -A {path}; touch {path}/x 2>&1 | grep -c Read-only", with_stderr=True)
    assert out == "1\n", out


async def test_read_only_paths_are_read_only_in_a_callable_too(host_sysctl: str) -> None:
    def write() -> None:
        try:
            with open(SYSCTL, "w") as file:
                file.write(other_value(host_sysctl))
        except OSError as exc:
            print(exc.strerror)

    _, out = await output_of(write)
    assert out == "Read-only file system\n"
