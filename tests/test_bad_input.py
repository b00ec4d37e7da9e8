"""Bad input: a clear exception, raised before anything is spawned where that is possible.

Argument errors are checked in the caller: each case below first stops the
fork server and then checks that no server was started for the rejected
call, so not a single process was created. Errors only the container can
see (a missing bind-mount source, command or cwd) are raised inside it and
re-raised in the caller with their class, errno and file name. The autouse
leak check (conftest.py) proves that nothing is left afterwards: no
container under the fork server, no child, no fd, no mount.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from procfs import fork_server_containers

import asynccontainer as ac
from asynccontainer._core import client as _client

SYSTEM = ac.HOST_SYSTEM_MAPPINGS
ALL_BUT = {name: tuple(n for n in ac.NAMESPACES if n != name) for name in ac.NAMESPACES}
MISSING = "/nonexistent-asynccontainer-test/path"

# Explicit, not left to conftest.py: anyio must see the mark when it collects
# a parametrized coroutine test, or the test loses its own parameters.
pytestmark = pytest.mark.anyio


async def rejected_before_spawn(
    error: type[BaseException], match: str, target: Any = ("true",), **keywords: Any
) -> BaseException:
    """Check that run_container raises exactly `error` without starting any process."""
    if isinstance(target, tuple):
        target = list(target)
    ac.shutdown_fork_server()
    assert _client._server is None
    with pytest.raises(error, match=match) as info:
        await ac.run_container(target, **keywords)
    assert type(info.value) is error
    assert _client._server is None, "a fork server was started for a rejected call"
    return info.value


def server_children() -> set[int]:
    return fork_server_containers()


async def raised_by_the_container(
    error: type[BaseException], match: str, target: Any = ("true",), **keywords: Any
) -> BaseException:
    """Check that run_container re-raises `error` from the container, traceback attached."""
    if isinstance(target, tuple):
        target = list(target)
    with anyio.fail_after(20), pytest.raises(error, match=match) as info:
        await ac.run_container(target, **keywords)
    exc = info.value
    assert type(exc) is error
    notes = getattr(exc, "__notes__", [])
    assert any(note.startswith("Raised in the container process") for note in notes), notes
    # The failed container was killed and reaped before the call returned.
    assert server_children() == set()
    return exc


# -- rejected in the caller ----------------------------------------------------

CASES: list[tuple[str, type[BaseException], str, dict[str, Any]]] = [
    # namespaces
    (
        "unknown-namespace",
        ValueError,
        r"unknown namespace name\(s\) 'bogus'; choose among cgroup, mnt",
        {"namespaces": ["mnt", "bogus"]},
    ),
    (
        "namespace-not-a-str",
        TypeError,
        r"namespace names are strings, not 7",
        {"namespaces": ["mnt", 7]},
    ),
    (
        "namespaces-as-a-string",
        TypeError,
        r"namespaces must be an iterable of names, not the string 'mnt'",
        {"namespaces": "mnt"},
    ),
    # mounts
    (
        "mount-item-a-str",
        TypeError,
        r"mounts holds FileSystem, FileSystemMapping or Symlink items, not '/usr'",
        {"mounts": ["/usr"]},
    ),
    (
        "mount-item-a-tuple",
        TypeError,
        r"mounts holds .* items, not \('/usr', '/usr'\)",
        {"mounts": [ac.WRITABLE_TMP, ("/usr", "/usr")]},
    ),
    (
        "single-file-system",
        TypeError,
        r"mounts is a sequence of mount items; wrap a single one as \(item,\)",
        {"mounts": ac.WRITABLE_TMP},
    ),
    (
        "single-file-system-mapping",
        TypeError,
        r"wrap a single one",
        {"mounts": ac.FileSystemMapping("/usr")},
    ),
    # ids
    ("host-uids-zero", ValueError, r"host_uids must be 1 or more, not 0", {"host_uids": 0}),
    ("host-uids-a-str", TypeError, r"host_uids must be an int, not '1'", {"host_uids": "1"}),
    ("host-uids-a-bool", TypeError, r"host_uids must be an int, not True", {"host_uids": True}),
    (
        "guest-uid-negative",
        ValueError,
        r"guest_uid must be between 0 and 4294967294, not -1",
        {"guest_uid": -1},
    ),
    (
        "guest-gid-too-large",
        ValueError,
        r"guest_gid must be between 0 and 4294967294, not 4294967295",
        {"guest_gid": 2**32 - 1},
    ),
    ("guest-gid-a-float", TypeError, r"guest_gid must be an int, not 1.0", {"guest_gid": 1.0}),
    (
        "host-uids-without-user",
        ValueError,
        r"user namespace; add 'user' to namespaces",
        {"host_uids": 2, "namespaces": ALL_BUT["user"]},
    ),
    (
        "guest-uid-without-user",
        ValueError,
        r"user namespace; add 'user' to namespaces",
        {"guest_uid": 1000, "namespaces": ALL_BUT["user"]},
    ),
    # root, mounts and populate need "mnt"
    (
        "root-missing",
        FileNotFoundError,
        r"the root directory does not exist",
        {"root": MISSING},
    ),
    (
        "root-a-file",
        NotADirectoryError,
        r"the root must be a directory",
        {"root": sys.executable},
    ),
    (
        "root-without-mnt",
        ValueError,
        r"root= needs the 'mnt' namespace.*add 'mnt' to namespaces",
        {"root": "/", "namespaces": ALL_BUT["mnt"]},
    ),
    (
        "mounts-without-mnt",
        ValueError,
        r"mounts= needs the 'mnt' namespace",
        {"mounts": [ac.WRITABLE_TMP], "namespaces": ALL_BUT["mnt"]},
    ),
    (
        "populate-without-mnt",
        ValueError,
        r"populate= needs the 'mnt' namespace",
        {"populate": print, "namespaces": ALL_BUT["mnt"]},
    ),
    (
        "populate-not-callable",
        TypeError,
        r"populate must be a callable taking no arguments, not 'hook'",
        {"populate": "hook"},
    ),
    # hostname
    (
        "hostname-without-uts",
        ValueError,
        r"hostname= needs the 'uts' namespace, or it would rename the host",
        {"hostname": "inside", "namespaces": ALL_BUT["uts"]},
    ),
    (
        "hostname-too-long",
        ValueError,
        r"hostname 'h{65}' must be 1 to 64 bytes",
        {"hostname": "h" * 65},
    ),
    ("hostname-empty", ValueError, r"hostname '' must be 1 to 64 bytes", {"hostname": ""}),
    ("hostname-not-a-str", TypeError, r"hostname must be a str, not 5", {"hostname": 5}),
    # env and cwd
    ("env-value-an-int", TypeError, r"env maps str to str, not 'A' to 1", {"env": {"A": 1}}),
    ("env-key-an-int", TypeError, r"env maps str to str, not 1 to 'a'", {"env": {1: "a"}}),
    (
        "env-key-with-equals",
        ValueError,
        r"env variable name 'A=B' or its value is not valid",
        {"env": {"A=B": "c"}},
    ),
    ("env-key-empty", ValueError, r"env variable name '' ", {"env": {"": "c"}}),
    (
        "cwd-relative",
        ValueError,
        r"cwd 'tmp' must be an absolute path inside the container",
        {"cwd": "tmp"},
    ),
    # flags
    (
        "writable-root-a-str",
        TypeError,
        r"writable_root must be True or False, not 'yes'",
        {"writable_root": "yes"},
    ),
    # stdio
    (
        "stdin-true",
        TypeError,
        r"stdin must be None, an fd or a file object, not True",
        {"stdin": True},
    ),
    (
        "stdin-a-str",
        TypeError,
        r"stdin must be None, an fd or a file object, not '/dev/null'",
        {"stdin": "/dev/null"},
    ),
    (
        "stdout-negative",
        ValueError,
        r"stdout=-5 is not supported; pass None, an fd, a file object, subprocess.PIPE",
        {"stdout": -5},
    ),
    (
        "stdin-stdout",
        ValueError,
        r"stdin=-2 is not supported; .*\(subprocess\.STDOUT is for stderr only\)",
        {"stdin": subprocess.STDOUT},
    ),
    (
        "stdout-negative-after-stdin-pipe",  # the pipe opened for stdin is closed
        ValueError,
        r"stdout=-5 is not supported",
        {"stdin": subprocess.PIPE, "stdout": -5},
    ),
]


@pytest.mark.parametrize(
    ("error", "match", "keywords"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
async def test_bad_argument(
    error: type[BaseException], match: str, keywords: dict[str, Any]
) -> None:
    exc = await rejected_before_spawn(error, match, **keywords)
    if isinstance(exc, OSError):
        assert exc.filename == keywords["root"]
        assert exc.errno == (errno.ENOENT if error is FileNotFoundError else errno.ENOTDIR)


TARGETS: list[tuple[str, type[BaseException], str, object]] = [
    (
        "command-a-str",
        TypeError,
        r"a command is a sequence of arguments, not the string 'true'; write \['true'\]",
        "true",
    ),
    ("command-empty", ValueError, r"the command is empty", []),
    ("command-argument-bytes", TypeError, r"command arguments are str, not b'true'", [b"true"]),
    ("command-argument-nul", ValueError, r"contains a NUL byte", ["echo", "a\0b"]),
    (
        "neither-command-nor-callable",
        TypeError,
        r"a target is a command \(a sequence of str\) or a callable, not 42",
        42,
    ),
]


@pytest.mark.parametrize(
    ("error", "match", "target"),
    [pytest.param(*case[1:], id=case[0]) for case in TARGETS],
)
async def test_bad_target(error: type[BaseException], match: str, target: object) -> None:
    await rejected_before_spawn(error, match, target, mounts=SYSTEM)


async def test_call_with_container_checks_its_arguments_too() -> None:
    ac.shutdown_fork_server()
    with pytest.raises(ValueError, match=r"unknown namespace name\(s\) 'nett'"):
        await ac.call_with_container(["true"], namespaces=["nett"])
    with pytest.raises(TypeError, match=r"not the string 'true'"):
        await ac.call_with_container("true")
    assert _client._server is None


async def test_stdin_a_closed_fd() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    await rejected_before_spawn(ValueError, rf"stdin={fd} is not an open file descriptor", stdin=fd)


# -- file systems, checked on construction ------------------------------------

FILE_SYSTEMS: list[tuple[str, type[BaseException], str, Callable[[], object]]] = [
    (
        "relative-mount-point",
        ValueError,
        r"mount point 'tmp' is relative; give an absolute path such as '/tmp'",
        lambda: ac.FileSystem("none", "tmp", "tmpfs"),
    ),
    (
        "dotdot-mount-point",
        ValueError,
        r"mount point '/a/../b' contains '..'",
        lambda: ac.FileSystem("none", "/a/../b", "tmpfs"),
    ),
    (
        "unknown-flag",
        ValueError,
        r"unknown mount flag\(s\) 'read-mostly'",
        lambda: ac.FileSystem("none", "/x", "tmpfs", flags={"read-mostly"}),
    ),
    (
        "flags-a-str",
        TypeError,
        r"flags must be an iterable of names, not the string 'read-only'",
        lambda: ac.FileSystem("none", "/x", "tmpfs", flags="read-only"),
    ),
    (
        "fsck",
        ValueError,
        r"check=True asks for fsck",
        lambda: ac.FileSystem("/dev/sda1", "/x", "ext4", check=True),
    ),
    (
        "relative-mapping-source",
        ValueError,
        r"mapping source 'usr' is relative",
        lambda: ac.FileSystemMapping("usr"),
    ),
    (
        "relative-mapping-target",
        ValueError,
        r"mapping target 'x' is relative",
        lambda: ac.FileSystemMapping("/usr", "x"),
    ),
]


# -- targets and hooks that cannot be sent -------------------------------------


async def test_closure_over_a_lock_cannot_be_sent() -> None:
    lock = threading.Lock()

    def target() -> None:
        with lock:
            pass

    exc = await rejected_before_spawn(
        TypeError,
        r"the target .* cannot be pickled to be sent to the container: "
        r"cannot pickle '_thread.lock' object\. Make it refer only to picklable objects",
        target,
    )
    assert exc.__cause__ is not None


async def test_lambda_over_a_socket_cannot_be_sent() -> None:
    left, right = socket.socketpair()
    with left, right:
        await rejected_before_spawn(
            TypeError,
            r"the target <function .*<lambda>.*> cannot be pickled.*cannot pickle 'socket' object",
            lambda: left.send(b"x"),
        )


async def test_populate_that_cannot_be_sent() -> None:
    lock = threading.Lock()

    def populate() -> None:
        with lock:
            pass

    await rejected_before_spawn(
        TypeError,
        r"the populate hook .* cannot be pickled.*'_thread.lock'",
        lambda: None,
        populate=populate,
    )


# -- raised inside the container and forwarded ---------------------------------


@pytest.mark.parametrize("as_mapping", [True, False], ids=["mapping", "file-system"])
async def test_missing_bind_mount_source(as_mapping: bool) -> None:
    item = (
        ac.FileSystemMapping(MISSING, "/x")
        if as_mapping
        else ac.FileSystem(MISSING, "/x", "none", flags={"bind-mount"})
    )
    exc = await raised_by_the_container(
        FileNotFoundError, rf"\[Errno 2\] .*{MISSING}", mounts=[*SYSTEM, item]
    )
    assert isinstance(exc, OSError)
    assert exc.errno == errno.ENOENT
    assert exc.filename == MISSING


async def test_missing_command() -> None:
    exc = await raised_by_the_container(
        FileNotFoundError,
        r"\[Errno 2\] .*'no-such-command-here'",
        ["no-such-command-here", "arg"],
        mounts=SYSTEM,
    )
    assert isinstance(exc, OSError)
    assert exc.errno == errno.ENOENT
    assert exc.filename == "no-such-command-here"


async def test_missing_command_by_path() -> None:
    exc = await raised_by_the_container(
        FileNotFoundError, r"\[Errno 2\] .*'/usr/bin/no-such'", ["/usr/bin/no-such"], mounts=SYSTEM
    )
    assert isinstance(exc, OSError)
    assert exc.filename == "/usr/bin/no-such"


async def test_cwd_missing_inside_the_container() -> None:
    exc = await raised_by_the_container(
        FileNotFoundError, rf"\[Errno 2\] .*{MISSING}", mounts=SYSTEM, cwd=MISSING
    )
    assert isinstance(exc, OSError)
    assert exc.errno == errno.ENOENT
    assert exc.filename == MISSING


async def test_cwd_a_file_inside_the_container() -> None:
    exc = await raised_by_the_container(
        NotADirectoryError, r"\[Errno 20\] .*/usr/bin/env", mounts=SYSTEM, cwd="/usr/bin/env"
    )
    assert isinstance(exc, OSError)
    assert exc.errno == errno.ENOTDIR


async def test_setup_failure_carries_the_containers_traceback() -> None:
    def populate() -> None:
        raise ValueError("populate failed on purpose")

    exc = await raised_by_the_container(
        ValueError, r"^populate failed on purpose\n", lambda: None, populate=populate
    )
    note = "\n".join(exc.__notes__)
    # The traceback is the container's: it names the hook and the step it ran in.
    assert "Traceback (most recent call last)" in note
    assert "in populate" in note
    assert "running the populate hook" in note


# -- stop() ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grace", "error", "match"),
    [
        (-1, ValueError, r"grace must be zero or more seconds, not -1"),
        (math.nan, ValueError, r"grace must be zero or more seconds, not nan"),
        ("1", TypeError, r"grace must be a number of seconds, not '1'"),
    ],
    ids=["negative", "nan", "str"],
)
async def test_stop_with_a_bad_grace(grace: object, error: type[BaseException], match: str) -> None:
    async with await ac.run_container(["sleep", "60"], mounts=SYSTEM) as container:
        with pytest.raises(error, match=match):
            await container.stop(grace=grace)  # type: ignore[arg-type]
        # Nothing was done: the container still runs.
        assert container.returncode is None
        assert os.path.exists(f"/proc/{container.pid}")


# -- issue 12: inputs that once spawned first, or meant something else -------------

MORE_CASES: list[tuple[str, type[BaseException], str, Callable[[], object]]] = [
    (
        "relative-bind-source",
        ValueError,
        r"the source 'data' of a bind mount is relative",
        lambda: ac.FileSystem("data", "/x", "none", flags={"bind-mount"}),
    ),
    (
        "nul-in-mount-point",
        ValueError,
        r"NUL byte",
        lambda: ac.FileSystem("none", "/a\0b", "tmpfs"),
    ),
    ("nul-in-device", ValueError, r"NUL byte", lambda: ac.FileSystem("/a\0", "/x", "none")),
    (
        "nul-in-options",
        ValueError,
        r"NUL byte",
        lambda: ac.FileSystem("none", "/x", "tmpfs", options="a\0"),
    ),
    ("nul-in-mapping", ValueError, r"NUL byte", lambda: ac.FileSystemMapping("/usr\0/x")),
    ("nul-in-link-target", ValueError, r"NUL byte", lambda: ac.Symlink("/l", "/t\0")),
    ("nul-in-cwd", ValueError, r"NUL byte", lambda: ac.ContainerSpec(cwd="/a\0")),
    ("nul-in-root", ValueError, r"NUL byte", lambda: ac.ContainerSpec(root="/a\0")),
    ("nul-in-env", ValueError, r"not valid", lambda: ac.ContainerSpec(env={"A": "b\0"})),
    (
        "memory-beyond-any-machine",
        ValueError,
        r"more than any machine has",
        lambda: ac.ContainerSpec(limits={"memory": 2**64}),
    ),
    (
        "supplementary-groups-a-string",
        TypeError,
        r"supplementary_groups is a sequence of names or ids, not 'root'",
        lambda: ac.ServiceSpec(["true"], supplementary_groups="root"),  # type: ignore[arg-type]
    ),
    (
        "negative-user",
        ValueError,
        r"user -1 is not an id",
        lambda: ac.ServiceSpec(["true"], user=-1),
    ),
    (
        "group-out-of-range",
        ValueError,
        r"group 4294967295 is not an id",
        lambda: ac.ServiceSpec(["true"], group=2**32 - 1),
    ),
    (
        "supplementary-group-negative",
        ValueError,
        r"supplementary_groups -5 is not an id",
        lambda: ac.ServiceSpec(["true"], supplementary_groups=[-5]),
    ),
]


@pytest.mark.parametrize(
    ("error", "match", "make"),
    [pytest.param(*case[1:], id=case[0]) for case in [*FILE_SYSTEMS, *MORE_CASES]],
)
def test_bad_values_are_refused_when_made(
    error: type[BaseException], match: str, make: Callable[[], object]
) -> None:
    ac.shutdown_fork_server()
    with pytest.raises(error, match=match) as info:
        make()
    assert type(info.value) is error
    assert _client._server is None
