"""Re-run the cases of tests/unprivileged/ as an unprivileged user (uid 65534).

Most users run asynccontainer without root: the container's user namespace
is then the only source of its privileges, setgroups must be denied before
gid_map is written, and only one id may be mapped. Those paths differ from
root's, so they are exercised for real, as `nobody`, with `setpriv`.

The unprivileged pytest runs inside a container made by asynccontainer
itself (as root, without a user namespace): the interpreter may live where
`nobody` cannot reach (a pyenv under /root, mode 0700); mapped into a fresh
tmpfs root, its parent directories are created world-readable, and the paths
stay the same. It mounts a proc and a sysfs of its own without masks
(`NESTING_MOUNTS`), which the kernel requires before it lets a user
namespace mount its own, and allows openat2 (`NESTING_SECCOMP`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from capture import NESTING_MOUNTS, NESTING_SECCOMP

import asynccontainer as ac

REPOSITORY = Path(__file__).resolve().parent.parent
NOBODY = 65534


def python_mappings() -> list[ac.FileSystemMapping]:
    """Map the interpreter, its libraries and the checkout at their own paths, read-only."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths.add(str(REPOSITORY))
    paths.update(os.path.realpath(p) for p in sys.path if p and os.path.isdir(p))
    # A path inside another mapped one is already there.
    roots = sorted(paths)
    kept = [p for p in roots if not any(p.startswith(q + "/") for q in roots if q != p)]
    return [ac.FileSystemMapping(p) for p in kept if not p.startswith(("/usr/", "/lib"))]


@pytest.mark.timeout(300)
async def test_cases_pass_as_an_unprivileged_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test switches to uid 65534 with setpriv and must run as root")
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed: apt-get install util-linux"
    log = tmp_path / "unprivileged.log"
    with log.open("wb") as output:
        returncode = await ac.call_with_container(
            [
                # A process of root's in the same pid namespace: the cases
                # check that nobody may not enter it.
                "sh",
                "-c",
                'sleep 600 & export ASYNCCONTAINER_TEST_FOREIGN_PID=$!; exec "$@"',
                "sh",
                setpriv,
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "--",
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "-q",
                "tests/unprivileged",
            ],
            namespaces=["mnt", "pid", "ipc", "uts", "net"],
            # /tmp first: a checkout or a virtual environment under /tmp is
            # mapped over it, not hidden by it.
            mounts=[
                ac.WRITABLE_TMP,
                # Where the hostile cases keep a directory outside /tmp.
                attrs.evolve(ac.WRITABLE_TMP, mount_point="/var/tmp"),
                *ac.HOST_SYSTEM_MAPPINGS,
                *python_mappings(),
                *NESTING_MOUNTS,
            ],
            env={
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": "/tmp",
                "PYTHONDONTWRITEBYTECODE": "1",
            },
            cwd=str(REPOSITORY),
            seccomp=NESTING_SECCOMP,
            stdin=None,
            stdout=output,
            stderr=output,
        )
    report = log.read_text(errors="replace")
    assert returncode == 0, f"the unprivileged run failed:\n{report}"
    assert " passed" in report and "skipped" not in report, report


@pytest.mark.timeout(300)
def test_the_unprivileged_run_works_from_a_checkout_under_tmp(tmp_path: Path) -> None:
    """A checkout under /tmp was hidden by the container's own /tmp, mounted after it."""
    checkout = tmp_path / "checkout"
    for part in ("asynccontainer", "tests", "pyproject.toml"):
        source = REPOSITORY / part
        if source.is_dir():
            shutil.copytree(source, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, checkout / part)
    # The nobody inside must be able to reach it.
    for directory in (tmp_path, checkout):
        directory.chmod(0o755)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", "asyncio"),
            "tests/test_unprivileged.py::test_cases_pass_as_an_unprivileged_user",
        ],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout
