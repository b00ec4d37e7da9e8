"""File systems in a container: Guix's mount-file-systems, step by step, and the mount values.

GUIX.md, "mount-file-systems": (1) everything private, (2) tmpfs root,
(3) /proc with "pid", (4) /sys read-only with "net", (5) /dev and its nodes,
devpts, the console and the fd links, (6) the user's mounts in order,
(7) pivot_root and a detach of the old root, (8) populate, chmod 0755 and a
read-only root unless writable_root. Each test names the step it checks.

Most checks run as a callable inside the container (see `inside`): it
returns a JSON value that comes back through a pipe, so that the assertions
are made here, with pytest's messages.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from capture import output_of, sh

import asynccontainer as ac
from asynccontainer._plan.build import MASKED_PATHS, READ_ONLY_PATHS

SYSTEM = ac.HOST_SYSTEM_MAPPINGS
THIS_FILE = os.path.abspath(__file__)
ALL_BUT = {name: [ns for ns in ac.NAMESPACES if ns != name] for name in ac.NAMESPACES}
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")


# -- helpers -------------------------------------------------------------------


async def inside(function: Callable[[], Any], **keywords: Any) -> Any:
    """Run `function` in a container and return its (JSON-able) value."""

    def report() -> None:
        value = function()
        sys.stdout.write(json.dumps(value))
        sys.stdout.flush()

    keywords.setdefault("stdin", subprocess.DEVNULL)
    returncode, out = await output_of(report, **keywords)
    assert returncode == 0, f"the callable failed inside (exit {returncode}); see its stderr"
    return json.loads(out)


def mountinfo() -> dict[str, dict[str, Any]]:
    """Parse /proc/self/mountinfo: the topmost mount at each mount point."""
    table: dict[str, dict[str, Any]] = {}
    with open("/proc/self/mountinfo") as file:
        for line in file:
            before, after = line.split(" - ")
            fields = before.split()
            fstype, source, super_options = after.split()
            table[fields[4]] = {
                "id": int(fields[0]),
                "parent": int(fields[1]),
                "root": fields[3],
                "options": fields[5].split(","),
                "optional": fields[6:],
                "fstype": fstype,
                "source": source,
                "super": super_options.split(","),
            }
    return table


def errno_of(action: Callable[[], object]) -> int:
    """Return 0 if `action()` succeeds, else the errno of the OSError it raises."""
    try:
        action()
    except OSError as exc:
        return exc.errno or -1
    return 0


def write_file(path: str, text: str = "x") -> None:
    with open(path, "w") as file:
        file.write(text)


def read_file(path: str) -> str:
    with open(path) as file:
        return file.read()


def mkdir_exit_code() -> None:
    """Exit with the errno of mkdir("/x"), 0 if it worked."""
    raise SystemExit(errno_of(lambda: os.mkdir("/x")))


# -- step 2 and 8: the root ------------------------------------------------------


async def test_root_is_a_tmpfs_with_mode_0755() -> None:
    """Steps 2 and 8: a fresh tmpfs is the root, chmod'ed 0755."""
    assert await sh("stat -c %a /") == (0, "755\n")
    table = await inside(mountinfo)
    assert table["/"]["fstype"] == "tmpfs"


async def test_root_is_read_only_by_default() -> None:
    """Step 8: the root is remounted read-only: mkdir /x fails with EROFS."""
    assert await ac.call_with_container(mkdir_exit_code) == errno.EROFS
    returncode, out = await sh("mkdir /x 2>&1")
    assert returncode != 0
    assert "Read-only file system" in out
    assert "ro" in (await inside(mountinfo))["/"]["options"]


async def test_writable_root_leaves_the_root_writable() -> None:
    """Step 8: writable_root=True skips the read-only remount."""
    assert await ac.call_with_container(mkdir_exit_code, writable_root=True) == 0
    assert "rw" in (await inside(mountinfo, writable_root=True))["/"]["options"]


async def test_populate_runs_after_pivot_root_before_the_root_turns_read_only() -> None:
    """Step 8: populate runs inside the new root, may write it, and the root is read-only after."""

    def populate() -> None:
        os.mkdir("/made")
        write_file(
            "/made/by-populate",
            json.dumps(
                {
                    # The host's tree is gone: pivot_root and the detach happened.
                    "host_file_visible": os.path.exists(THIS_FILE),
                    # /dev was mounted before.
                    "dev_null": os.path.exists("/dev/null"),
                    "user_mount": os.path.ismount("/data"),
                }
            ),
        )

    def target() -> dict[str, Any]:
        return {
            "populated": json.loads(read_file("/made/by-populate")),
            "mkdir": errno_of(lambda: os.mkdir("/y")),
            "overwrite": errno_of(lambda: write_file("/made/by-populate")),
        }

    result = await inside(
        target, populate=populate, mounts=[ac.FileSystem("none", "/data", "tmpfs")]
    )
    assert result == {
        "populated": {"host_file_visible": False, "dev_null": True, "user_mount": True},
        "mkdir": errno.EROFS,
        "overwrite": errno.EROFS,
    }


async def test_populate_with_a_command_target() -> None:
    """Step 8: a file made by populate is read by a command target."""

    def populate() -> None:
        write_file("/greeting", "made by populate\n")

    assert await sh("cat /greeting", populate=populate) == (0, "made by populate\n")


async def test_populate_error_is_raised_in_the_caller() -> None:
    """Step 5 of run-container: an exception in the set-up is re-raised in the caller."""

    def populate() -> None:
        raise LookupError("populate failed on purpose")

    with pytest.raises(LookupError, match="populate failed on purpose") as info:
        await ac.run_container(["true"], mounts=SYSTEM, populate=populate)
    assert any("Raised in the container process" in note for note in info.value.__notes__)


async def test_old_root_is_detached_and_only_the_essentials_are_mounted() -> None:
    """Steps 1-7: after pivot_root only the container's own mounts remain."""
    table = await inside(mountinfo)
    expected = {"/", "/proc", "/sys", "/dev", "/dev/pts"}
    expected.update(f"/dev/{node}" for node in (*DEVICE_NODES, "fuse"))
    if not os.path.exists("/dev/fuse"):
        expected.discard("/dev/fuse")
    # The host's knobs under /proc and /sys, covered where this kernel has them.
    expected.update(path for path in (*READ_ONLY_PATHS, *MASKED_PATHS) if os.path.exists(path))
    assert set(table) == expected


async def test_mounts_are_private() -> None:
    """Step 1: no mount of the container is shared with a peer (no propagation to the host)."""
    table = await inside(mountinfo, lock_mounts=False)
    for point, entry in table.items():
        assert not any(field.startswith("shared:") for field in entry["optional"]), point


async def test_mounts_do_not_propagate_to_a_shared_host_mount(tmp_path: Path) -> None:
    """Step 1: with a shared host mount as root, nothing mounted inside propagates out.

    Without a user namespace the container's copy of a shared mount stays a
    peer of the host's, so only step 1 (MS_REC|MS_PRIVATE) keeps /proc, /dev
    and the user's mounts from appearing on the host (and lets pivot_root work).
    """
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        with open("/proc/self/mountinfo") as file:
            before = file.read()
        assert f" {shared} " in before
        returncode = await ac.call_with_container(
            lambda: None,
            root=str(shared),
            namespaces=ALL_BUT["user"],
            mounts=[ac.FileSystem("none", "/inner", "tmpfs")],
            stdin=subprocess.DEVNULL,
        )
        with open("/proc/self/mountinfo") as file:
            after = file.read()
    finally:
        subprocess.run(["umount", "--recursive", "--lazy", str(shared)], check=True)
    assert returncode == 0
    assert after == before


# -- step 3: /proc ---------------------------------------------------------------


async def test_proc_is_mounted_nosuid_nodev_noexec_with_pid_namespace() -> None:
    """Step 3: /proc is a proc mount (nosuid,nodev,noexec) of the container's pid namespace."""

    def look() -> dict[str, Any]:
        return {"proc": mountinfo()["/proc"], "self": os.readlink("/proc/self")}

    result = await inside(look)
    assert result["proc"]["fstype"] == "proc"
    assert {"nosuid", "nodev", "noexec"} <= set(result["proc"]["options"])
    # The callable is PID 1 of the new pid namespace, as this /proc shows.
    assert result["self"] == "1"


async def test_no_proc_without_pid_namespace() -> None:
    """Step 3: without "pid", /proc is not mounted."""
    assert await inside(lambda: os.path.lexists("/proc"), namespaces=["mnt", "user"]) is False
    assert await inside(lambda: os.path.lexists("/proc"), namespaces=ALL_BUT["pid"]) is False


# -- step 4: /sys ----------------------------------------------------------------


async def test_sys_is_mounted_read_only_with_net_namespace() -> None:
    """Step 4: /sys is sysfs, nosuid,nodev,noexec,ro, when "net" is a namespace."""

    def look() -> dict[str, Any]:
        return {
            "sys": mountinfo().get("/sys"),
            "lo": os.path.isdir("/sys/class/net/lo"),
            "write": errno_of(lambda: os.mkdir("/sys/x")),
        }

    result = await inside(look)
    assert result["sys"] is not None, "/sys is not mounted"
    assert result["sys"]["fstype"] == "sysfs"
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(result["sys"]["options"])
    assert result["lo"] is True
    assert result["write"] == errno.EROFS


async def test_no_sys_without_net_namespace() -> None:
    """Step 4: without "net", /sys is not mounted."""
    assert await inside(lambda: os.path.lexists("/sys"), namespaces=ALL_BUT["net"]) is False
    assert await inside(lambda: os.path.lexists("/sys"), namespaces=["mnt", "user"]) is False


# -- step 5: /dev ----------------------------------------------------------------


async def test_dev_is_a_tmpfs_mode_755_noexec_strictatime() -> None:
    """Step 5: /dev is a tmpfs, mode=755, noexec, strictatime."""

    def look() -> dict[str, Any]:
        return {"dev": mountinfo()["/dev"], "mode": stat.S_IMODE(os.stat("/dev").st_mode)}

    result = await inside(look)
    dev = result["dev"]
    assert dev["fstype"] == "tmpfs"
    assert "noexec" in dev["options"]
    # strictatime shows as neither relatime nor noatime.
    assert "relatime" not in dev["options"]
    assert "noatime" not in dev["options"]
    assert "mode=755" in dev["super"]
    assert result["mode"] == 0o755


async def test_device_nodes_exist_and_work() -> None:
    """Step 5: null zero full random urandom tty are bound from the host and work."""

    def look() -> dict[str, Any]:
        nodes = {name: stat.S_ISCHR(os.stat(f"/dev/{name}").st_mode) for name in DEVICE_NODES}
        rdevs = {name: os.stat(f"/dev/{name}").st_rdev for name in DEVICE_NODES}
        with open("/dev/null", "wb") as null:
            null.write(b"discarded")
        with open("/dev/zero", "rb") as zero:
            zeros = zero.read(16)
        with open("/dev/urandom", "rb") as urandom:
            random_bytes = urandom.read(32)
        with open("/dev/null", "rb") as null:
            empty = null.read()

        def fill() -> None:
            with open("/dev/full", "wb", buffering=0) as full:
                full.write(b"x")

        return {
            "chr": nodes,
            "rdev": rdevs,
            "zeros": zeros.hex(),
            "random_length": len(random_bytes),
            "random_varied": len(set(random_bytes)) > 1,
            "null_read": empty.hex(),
            "full": errno_of(fill),
        }

    result = await inside(look)
    assert result["chr"] == dict.fromkeys(DEVICE_NODES, True)
    assert result["rdev"] == {name: os.stat(f"/dev/{name}").st_rdev for name in DEVICE_NODES}
    assert result["zeros"] == "00" * 16
    assert result["random_length"] == 32
    assert result["random_varied"] is True
    assert result["null_read"] == ""
    assert result["full"] == errno.ENOSPC


async def test_device_nodes_from_the_shell() -> None:
    """Step 5: commands can use /dev/null and /dev/zero."""
    returncode, out = await sh("echo gone > /dev/null && head -c 8 /dev/zero | od -An -tx1")
    assert returncode == 0
    assert out.split() == ["00"] * 8


async def test_dev_pts_is_a_new_devpts_instance_and_ptmx_links_into_it() -> None:
    """Step 5: /dev/pts is a devpts newinstance; /dev/ptmx -> pts/ptmx allocates there."""
    host_pts = os.stat("/dev/pts").st_dev
    # A terminal on the host, so that the host's instance is busy while the
    # container's must still start from 0.
    master, slave = os.openpty()
    try:

        def look() -> dict[str, Any]:
            entries_before = sorted(os.listdir("/dev/pts"))
            pty_master, pty_slave = os.openpty()
            try:
                name = os.ttyname(pty_slave)
            finally:
                os.close(pty_master)
                os.close(pty_slave)
            return {
                "pts": mountinfo()["/dev/pts"],
                "dev": os.stat("/dev/pts").st_dev,
                "ptmx": os.readlink("/dev/ptmx"),
                "before": entries_before,
                "name": name,
            }

        result = await inside(look)
    finally:
        os.close(master)
        os.close(slave)
    assert result["pts"]["fstype"] == "devpts"
    assert "ptmxmode=666" in result["pts"]["super"]
    assert result["dev"] != host_pts
    assert result["ptmx"] == "pts/ptmx"
    # Nothing of the host's terminals shows in a new instance.
    assert result["before"] == ["ptmx"]
    assert result["name"] == "/dev/pts/0"


async def test_fd_and_stdio_links() -> None:
    """Step 5: /dev/fd -> /proc/self/fd and /dev/stdin|stdout|stderr -> /proc/self/fd/0|1|2."""

    def look() -> dict[str, str]:
        return {name: os.readlink(f"/dev/{name}") for name in ("fd", "stdin", "stdout", "stderr")}

    assert await inside(look) == {
        "fd": "/proc/self/fd",
        "stdin": "/proc/self/fd/0",
        "stdout": "/proc/self/fd/1",
        "stderr": "/proc/self/fd/2",
    }
    # The links work: the shell writes to its stdout through /dev/stdout.
    assert await sh("echo through-the-link > /dev/stdout") == (0, "through-the-link\n")


def console() -> dict[str, Any]:
    present = os.path.exists("/dev/console")
    return {
        "present": present,
        "same_tty": present and os.stat("/dev/console").st_rdev == os.fstat(0).st_rdev,
        "mounted": "/dev/console" in mountinfo(),
    }


async def test_console_is_the_tty_of_stdin() -> None:
    """Step 5: /dev/console is bound to the terminal that is the container's stdin."""
    master, slave = os.openpty()
    try:
        result = await inside(console, stdin=slave)
    finally:
        os.close(master)
        os.close(slave)
    assert result == {"present": True, "same_tty": True, "mounted": True}


async def test_no_console_when_stdin_is_not_a_tty() -> None:
    """Step 5: without a terminal on stdin there is no /dev/console."""
    assert await inside(console, stdin=subprocess.DEVNULL) == {
        "present": False,
        "same_tty": False,
        "mounted": False,
    }
    read_end, write_end = os.pipe()
    try:
        result = await inside(console, stdin=read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result["present"] is False


# -- step 6: the user's mounts ---------------------------------------------------------


async def test_user_mounts_in_order_a_mount_inside_the_previous_one() -> None:
    """Step 6: mounts are made in order: tmpfs /a, then tmpfs /a/b inside it."""
    mounts = [
        ac.FileSystem("none", "/a", "tmpfs"),
        ac.FileSystem("none", "/a/b", "tmpfs", options="size=1m"),
    ]

    def look() -> dict[str, Any]:
        write_file("/a/in-a", "a")
        write_file("/a/b/in-b", "b")
        table = mountinfo()
        return {
            "a": table["/a"],
            "b": table["/a/b"],
            "a_lists": sorted(os.listdir("/a")),
            "b_lists": sorted(os.listdir("/a/b")),
        }

    result = await inside(look, mounts=mounts)
    assert result["a"]["fstype"] == result["b"]["fstype"] == "tmpfs"
    # /a/b is mounted on /a, not on the root: /a came first.
    assert result["b"]["parent"] == result["a"]["id"]
    assert "size=1024k" in result["b"]["super"]
    assert result["a_lists"] == ["b", "in-a"]
    assert result["b_lists"] == ["in-b"]


async def test_mapping_is_read_only_by_default(tmp_path: Path) -> None:
    """Step 6: a FileSystemMapping is a read-only bind mount: writes fail with EROFS."""
    (tmp_path / "existing").write_text("host content")

    def look() -> dict[str, Any]:
        return {
            "read": read_file("/ro/existing"),
            "create": errno_of(lambda: write_file("/ro/new")),
            "overwrite": errno_of(lambda: write_file("/ro/existing", "changed")),
            "options": mountinfo()["/ro"]["options"],
        }

    result = await inside(look, mounts=[ac.FileSystemMapping(str(tmp_path), "/ro")])
    assert result["read"] == "host content"
    assert result["create"] == errno.EROFS
    assert result["overwrite"] == errno.EROFS
    assert "ro" in result["options"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert (tmp_path / "existing").read_text() == "host content"


async def test_writable_mapping_writes_reach_the_host(tmp_path: Path) -> None:
    """Step 6: writable=True: a file written inside appears on the host."""

    def write() -> None:
        write_file("/out/from-inside", "written in the container")

    mapping = ac.FileSystemMapping(str(tmp_path), "/out", writable=True)
    assert await ac.call_with_container(write, mounts=[mapping]) == 0
    assert (tmp_path / "from-inside").read_text() == "written in the container"
    assert await sh("echo by-shell > /out/shell", mounts=[*SYSTEM, mapping]) == (0, "")
    assert (tmp_path / "shell").read_text() == "by-shell\n"


async def test_mapping_a_single_file(tmp_path: Path) -> None:
    """Step 6: a file (not a directory) can be mapped; its mount point is a file."""
    source = tmp_path / "settings.conf"
    source.write_text("key = value\n")

    def look() -> dict[str, Any]:
        mode = os.stat("/etc/app/settings.conf").st_mode
        return {
            "regular": stat.S_ISREG(mode),
            "text": read_file("/etc/app/settings.conf"),
            "write": errno_of(lambda: write_file("/etc/app/settings.conf", "changed")),
            "mounted": os.path.ismount("/etc/app/settings.conf")
            or "/etc/app/settings.conf" in mountinfo(),
        }

    mapping = ac.FileSystemMapping(str(source), "/etc/app/settings.conf")
    assert await inside(look, mounts=[mapping]) == {
        "regular": True,
        "text": "key = value\n",
        "write": errno.EROFS,
        "mounted": True,
    }


async def test_mapping_target_defaults_to_source_and_can_differ(tmp_path: Path) -> None:
    """Step 6: the target is the source path unless given; parents of it are created."""
    (tmp_path / "marker").write_text("here")
    same = ac.FileSystemMapping(str(tmp_path))
    elsewhere = ac.FileSystemMapping(str(tmp_path), "/deep/er/target")

    def look() -> dict[str, Any]:
        return {
            "at_source": read_file(f"{tmp_path}/marker"),
            "at_target": read_file("/deep/er/target/marker"),
        }

    assert await inside(look, mounts=[same, elsewhere]) == {
        "at_source": "here",
        "at_target": "here",
    }

    def only_target() -> dict[str, bool]:
        return {
            "source": os.path.exists(str(tmp_path)),
            "target": os.path.exists("/deep/er/target/marker"),
        }

    assert await inside(only_target, mounts=[elsewhere]) == {"source": False, "target": True}


async def test_missing_mapping_source_raises_file_not_found(tmp_path: Path) -> None:
    """run-container step 8: a wrong bind mount becomes ENOENT in the caller."""
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as info:
        await ac.run_container(["true"], mounts=[*SYSTEM, ac.FileSystemMapping(missing, "/m")])
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == missing


async def test_symlink_items_create_links() -> None:
    """Step 6: Symlink items make symbolic links (parents created), in order with mounts."""
    mounts = [
        ac.FileSystem("none", "/data", "tmpfs"),
        ac.Symlink("/link-to-data", "/data"),
        ac.Symlink("/some/dir/relative", "../../data"),
    ]

    def look() -> dict[str, Any]:
        write_file("/link-to-data/through-link", "ok")
        return {
            "absolute": os.readlink("/link-to-data"),
            "relative": os.readlink("/some/dir/relative"),
            "is_link": os.path.islink("/link-to-data"),
            "written": read_file("/data/through-link"),
            "via_relative": read_file("/some/dir/relative/through-link"),
        }

    assert await inside(look, mounts=mounts) == {
        "absolute": "/data",
        "relative": "../../data",
        "is_link": True,
        "written": "ok",
        "via_relative": "ok",
    }


async def test_flags_and_options_of_user_file_systems_reach_the_kernel(tmp_path: Path) -> None:
    """Step 6: a FileSystem's flags and options are those of its mount."""
    mounts = [
        ac.FileSystem(
            "none", "/t", "tmpfs", flags={"no-suid", "no-dev", "no-exec"}, options="mode=700"
        ),
        ac.FileSystem(str(tmp_path), "/b", "none", flags={"bind-mount", "read-only", "no-exec"}),
        ac.FileSystem(str(tmp_path), "/w", "none", flags={"bind-mount", "no-suid"}),
    ]

    def look() -> dict[str, Any]:
        table = mountinfo()
        return {point: table[point] for point in ("/t", "/b", "/w")}

    result = await inside(look, mounts=mounts)
    assert {"nosuid", "nodev", "noexec", "rw"} <= set(result["/t"]["options"])
    assert "mode=700" in result["/t"]["super"]
    assert {"ro", "noexec"} <= set(result["/b"]["options"])
    assert {"rw", "nosuid"} <= set(result["/w"]["options"])
    assert "noexec" not in result["/w"]["options"]


async def test_propagation_flags_of_user_file_systems() -> None:
    """Step 6: "shared" and "unbindable" set the propagation type of a mount."""
    mounts = [
        ac.FileSystem("none", "/shared", "tmpfs", flags={"shared"}),
        ac.FileSystem("none", "/unbindable", "tmpfs", flags={"unbindable"}),
        ac.FileSystem("none", "/private", "tmpfs", flags={"private"}),
    ]

    def look() -> dict[str, Any]:
        table = mountinfo()
        return {point: table[point]["optional"] for point in ("/shared", "/unbindable", "/private")}

    result = await inside(look, mounts=mounts, lock_mounts=False)
    assert any(field.startswith("shared:") for field in result["/shared"])
    assert result["/unbindable"] == ["unbindable"]
    assert result["/private"] == []


# -- the stock lists ------------------------------------------------------------------


async def test_host_system_mappings_recreate_symlinks_and_run_sh() -> None:
    """HOST_SYSTEM_MAPPINGS: /bin, /lib, /lib64, /sbin are links as on the host; sh runs."""
    links = ("/bin", "/sbin", "/lib", "/lib64")
    host = {path: os.readlink(path) if os.path.islink(path) else None for path in links}
    # On this (merged-/usr Debian) host they are links into /usr.
    assert all(target is not None and target.startswith("usr/") for target in host.values()), host
    for path, target in host.items():
        assert ac.Symlink(path, target) in SYSTEM

    def look() -> dict[str, Any]:
        return {
            "links": {p: os.readlink(p) if os.path.islink(p) else None for p in links},
            "usr_write": errno_of(lambda: write_file("/usr/x")),
            "usr_options": mountinfo()["/usr"]["options"],
        }

    result = await inside(look, mounts=SYSTEM)
    assert result["links"] == host
    assert result["usr_write"] == errno.EROFS
    assert "ro" in result["usr_options"]
    assert await sh("echo sh runs; readlink /bin") == (0, f"sh runs\n{host['/bin']}\n")


async def test_container_file_systems_as_user_mounts() -> None:
    """CONTAINER_FILE_SYSTEMS: devpts /dev/pts, tmpfs /dev/shm, mqueue /dev/mqueue mount."""

    def look() -> dict[str, Any]:
        table = mountinfo()
        write_file("/dev/shm/segment", "shared memory")
        pty_master, pty_slave = os.openpty()
        os.close(pty_master)
        os.close(pty_slave)
        return {
            point: table[point]["fstype"] for point in ("/dev/pts", "/dev/shm", "/dev/mqueue")
        } | {
            "shm_options": table["/dev/shm"]["options"],
            "shm_mode": stat.S_IMODE(os.stat("/dev/shm").st_mode),
            "mqueue_options": table["/dev/mqueue"]["options"],
        }

    result = await inside(look, mounts=ac.CONTAINER_FILE_SYSTEMS)
    assert result["/dev/pts"] == "devpts"
    assert result["/dev/shm"] == "tmpfs"
    assert result["/dev/mqueue"] == "mqueue"
    assert {"rw", "nosuid", "nodev", "noexec"} <= set(result["shm_options"])
    assert result["shm_mode"] == 0o1777
    assert {"nosuid", "nodev", "noexec"} <= set(result["mqueue_options"])


async def test_writable_tmp_on_a_read_only_root() -> None:
    """WRITABLE_TMP: /tmp is a writable tmpfs (mode 1777) while / stays read-only."""

    def look() -> dict[str, Any]:
        write_file("/tmp/scratch", "scratch")
        return {
            "tmp": read_file("/tmp/scratch"),
            "tmp_mode": stat.S_IMODE(os.stat("/tmp").st_mode),
            "tmp_fstype": mountinfo()["/tmp"]["fstype"],
            "root": errno_of(lambda: os.mkdir("/x")),
        }

    assert await inside(look, mounts=[ac.WRITABLE_TMP]) == {
        "tmp": "scratch",
        "tmp_mode": 0o1777,
        "tmp_fstype": "tmpfs",
        "root": errno.EROFS,
    }
    assert await sh("echo hi > /tmp/f && cat /tmp/f", mounts=[*SYSTEM, ac.WRITABLE_TMP]) == (
        0,
        "hi\n",
    )


async def test_network_file_mappings_show_the_hosts_files() -> None:
    """NETWORK_FILE_MAPPINGS: /etc/resolv.conf, nsswitch.conf, services, hosts, all read-only."""
    present = [m for m in ac.NETWORK_FILE_MAPPINGS if os.path.exists(m.source)]
    assert present, "none of the network files exists on this host"
    host = {m.target: Path(m.source).read_text() for m in present}
    targets = list(host)

    def look() -> dict[str, Any]:
        table = mountinfo()
        return {
            "text": {path: read_file(path) for path in targets},
            "rw": {path: "rw" in table[path]["options"] for path in targets},
        }

    result = await inside(look, mounts=present)
    assert result["text"] == host
    assert result["rw"] == {m.target: m.writable for m in present}
    # Guix maps resolv.conf writable; a root caller's container could rewrite the host's.
    assert {m.target for m in ac.NETWORK_FILE_MAPPINGS if m.writable} == set()


# -- loopback ------------------------------------------------------------------------


def loopback() -> dict[str, Any]:
    def connect() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect(server.getsockname())
                connection, _ = server.accept()
                connection.close()

    flags = None
    if os.path.exists("/sys/class/net/lo/flags"):
        flags = int(read_file("/sys/class/net/lo/flags"), 16)
    hosts = read_file("/etc/hosts") if os.path.exists("/etc/hosts") else None
    return {"connect": errno_of(connect), "lo_flags": flags, "hosts": hosts}


async def test_loopback_is_up_and_etc_hosts_written_with_net() -> None:
    """With "net" and loopback_network (default): lo is up, /etc/hosts has 127.0.0.1 localhost."""
    result = await inside(loopback)
    assert result["connect"] == 0
    assert result["lo_flags"] is not None
    assert result["lo_flags"] & 0x1  # IFF_UP
    assert "127.0.0.1 localhost" in result["hosts"].splitlines()


async def test_loopback_network_false_leaves_lo_down() -> None:
    """loopback_network=False: lo stays down, 127.0.0.1 is unreachable, no /etc/hosts."""
    result = await inside(loopback, loopback_network=False)
    assert result["connect"] in {errno.EADDRNOTAVAIL, errno.ENETUNREACH}
    assert result["lo_flags"] is not None
    assert not result["lo_flags"] & 0x1
    assert result["hosts"] is None


# -- root=PATH -----------------------------------------------------------------------


async def test_root_path_becomes_the_root(tmp_path: Path) -> None:
    """root=PATH: that host directory is the root; read-only unless writable_root."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_text("in the root directory")

    def look() -> dict[str, Any]:
        return {
            "file": read_file("/file"),
            "write": errno_of(lambda: write_file("/new")),
            "dev_null": os.path.exists("/dev/null"),
            "host_file_visible": os.path.exists(THIS_FILE),
        }

    assert await inside(look, root=str(root)) == {
        "file": "in the root directory",
        "write": errno.EROFS,
        "dev_null": True,
        "host_file_visible": False,
    }
    assert not (root / "new").exists()
    # The read-only remount was the container's own: the host's stays writable.
    (root / "still-writable").write_text("yes")

    def write() -> None:
        write_file("/written", "from inside")

    assert await ac.call_with_container(write, root=root, writable_root=True) == 0
    assert (root / "written").read_text() == "from inside"


async def test_root_that_does_not_exist_raises_before_spawning(tmp_path: Path) -> None:
    """root=PATH that does not exist: FileNotFoundError in the caller, nothing spawned."""
    missing = tmp_path / "missing"
    # In a cancelled scope, any await (such as asking the fork server for a
    # container) would raise the cancellation instead of the expected error.
    with anyio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(FileNotFoundError) as info:
            await ac.run_container(["true"], root=missing, mounts=SYSTEM)
    assert info.value.filename == str(missing)
    assert not getattr(info.value, "__notes__", None)


async def test_root_that_is_a_file_raises_before_spawning(tmp_path: Path) -> None:
    """root=PATH that is a file: NotADirectoryError in the caller, nothing spawned."""
    file = tmp_path / "file"
    file.write_text("")
    with anyio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(NotADirectoryError) as info:
            await ac.call_with_container(["true"], root=str(file), mounts=SYSTEM)
    assert info.value.filename == str(file)
    assert not getattr(info.value, "__notes__", None)


# -- the host's mount table -------------------------------------------------------------


async def test_host_mount_table_unchanged_after_twenty_containers(tmp_path: Path) -> None:
    """Steps 1 and 7: nothing mounted in a container reaches the host's mount table."""
    with open("/proc/self/mountinfo") as file:
        before = file.read()
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "file").write_text("file")
    out = tmp_path / "out"
    out.mkdir()
    variants: list[dict[str, Any]] = [
        {},
        {"mounts": SYSTEM},
        {"mounts": [*SYSTEM, ac.WRITABLE_TMP, *ac.CONTAINER_FILE_SYSTEMS]},
        {"mounts": [ac.FileSystem("none", "/a", "tmpfs"), ac.FileSystem("none", "/a/b", "tmpfs")]},
        {"mounts": [ac.FileSystemMapping(str(tmp_path), "/host")]},
        {"mounts": [ac.FileSystemMapping(str(tmp_path / "file"), "/etc/file")]},
        {"mounts": [ac.FileSystem("none", "/s", "tmpfs", flags={"shared"})]},
        {"mounts": [ac.FileSystem(str(tmp_path), "/s", "none", flags={"bind-mount", "shared"})]},
        {"mounts": SYSTEM, "writable_root": True},
        {"mounts": SYSTEM, "lock_mounts": False},
        {"mounts": [*SYSTEM, ac.WRITABLE_TMP], "namespaces": ["mnt", "user"]},
        {"mounts": SYSTEM, "namespaces": ALL_BUT["net"]},
        {"mounts": SYSTEM, "namespaces": ALL_BUT["pid"]},
        {"mounts": [ac.FileSystemMapping(str(tmp_path))], "root": str(root)},
        {"mounts": SYSTEM, "root": str(root), "writable_root": True},
        {"mounts": [*SYSTEM, *(m for m in ac.NETWORK_FILE_MAPPINGS if os.path.exists(m.source))]},
        {"mounts": [ac.FileSystemMapping(str(out), "/out", writable=True)]},
        {"mounts": [ac.Symlink("/l", "/a"), ac.FileSystem("none", "/a", "tmpfs")]},
        {"mounts": SYSTEM, "populate": lambda: os.mkdir("/populated")},
        {"mounts": [*SYSTEM, ac.WRITABLE_TMP], "loopback_network": False},
    ]
    assert len(variants) == 20
    returncodes: dict[int, int] = {}

    async def one(number: int, keywords: dict[str, Any]) -> None:
        returncodes[number] = await ac.call_with_container(
            lambda: None, stdin=subprocess.DEVNULL, **keywords
        )

    async with anyio.create_task_group() as group:
        for number, keywords in enumerate(variants):
            group.start_soon(one, number, keywords)
    assert returncodes == dict.fromkeys(range(20), 0)
    with open("/proc/self/mountinfo") as file:
        assert file.read() == before


async def test_mounts_made_by_a_command_stay_inside() -> None:
    """Step 1: a mount made inside the container (everything private) never reaches the host."""
    with open("/proc/self/mountinfo") as file:
        before = file.read()
    script = "mount -t tmpfs none /tmp && grep -c ' /tmp ' /proc/self/mountinfo"
    # CAP_SYS_ADMIN kept, so that the mount is made.
    returncode, out = await sh(
        script, mounts=[*SYSTEM, ac.FileSystem("none", "/tmp", "tmpfs")], capabilities=None
    )
    assert (returncode, out) == (0, "2\n")
    with open("/proc/self/mountinfo") as file:
        assert file.read() == before


# -- the value classes ---------------------------------------------------------------


def test_relative_mount_point_is_refused() -> None:
    """FileSystem: a relative mount point raises ValueError (Guix wants absolute ones)."""
    with pytest.raises(ValueError, match="relative"):
        ac.FileSystem("none", "tmp", "tmpfs")
    with pytest.raises(ValueError):
        ac.FileSystemMapping("relative/source")
    with pytest.raises(ValueError):
        ac.FileSystemMapping("/source", "relative/target")
    with pytest.raises(ValueError):
        ac.Symlink("relative/link", "/target")


def test_dot_dot_in_a_mount_point_is_refused() -> None:
    """FileSystem: ".." in a mount point raises ValueError (it could climb out of the root)."""
    with pytest.raises(ValueError, match=r"\.\."):
        ac.FileSystem("none", "/a/../../etc", "tmpfs")
    with pytest.raises(ValueError):
        ac.FileSystemMapping("/a/../b")
    with pytest.raises(ValueError):
        ac.FileSystemMapping("/a", "/..")


def test_unknown_flag_is_refused_by_name() -> None:
    """FileSystem: an unknown flag raises ValueError naming it."""
    with pytest.raises(ValueError, match="no-such-flag"):
        ac.FileSystem("none", "/t", "tmpfs", flags={"read-only", "no-such-flag"})


def test_flags_as_a_plain_string_are_refused() -> None:
    """FileSystem: flags="read-only" (a string, not a set of names) raises TypeError."""
    with pytest.raises(TypeError):
        ac.FileSystem("none", "/t", "tmpfs", flags="read-only")  # type: ignore[arg-type]


def test_check_true_is_refused() -> None:
    """FileSystem: check=True (fsck before mounting) raises ValueError."""
    with pytest.raises(ValueError, match="check"):
        ac.FileSystem("/dev/sda1", "/mnt", "ext4", check=True)
    assert ac.FileSystem("/dev/sda1", "/mnt", "ext4", check=False).check is False


def test_flags_become_a_frozenset_of_known_names() -> None:
    """FileSystem: flags are stored as a frozenset; the known names map to MS_* bits."""
    fs = ac.FileSystem("none", "/t", "tmpfs", flags=["no-exec", "no-suid", "no-exec"])
    assert fs.flags == frozenset({"no-exec", "no-suid"})
    assert isinstance(fs.flags, frozenset)
    assert ac.FileSystem("none", "/t", "tmpfs").flags == frozenset()
    for name in ("read-only", "bind-mount", "no-suid", "no-dev", "no-exec", "no-atime"):
        assert name in ac.MOUNT_FLAGS
    for name in ("strict-atime", "private"):
        assert name in ac.MOUNT_FLAGS


def test_mapping_target_defaults_to_source() -> None:
    """FileSystemMapping: target defaults to source; writable defaults to False."""
    mapping = ac.FileSystemMapping("/srv/data")
    assert mapping.target == "/srv/data"
    assert mapping.writable is False
    assert ac.FileSystemMapping("/srv/data", "/data").target == "/data"


def test_to_bind_mount() -> None:
    """FileSystemMapping.to_bind_mount(): bind-mount, plus read-only unless writable."""
    read_only = ac.FileSystemMapping("/srv/data", "/data").to_bind_mount()
    assert read_only == ac.FileSystem(
        "/srv/data", "/data", "none", flags=frozenset({"bind-mount", "read-only"})
    )
    assert read_only.flags == {"bind-mount", "read-only"}
    writable = ac.FileSystemMapping("/srv/data", writable=True).to_bind_mount()
    assert writable.flags == {"bind-mount"}
    assert (writable.device, writable.mount_point) == ("/srv/data", "/srv/data")


def test_trailing_and_doubled_slashes_are_normalised() -> None:
    """Paths are normalised: trailing and doubled slashes removed."""
    assert ac.FileSystem("none", "/a/b/", "tmpfs").mount_point == "/a/b"
    assert ac.FileSystem("none", "//a//b", "tmpfs").mount_point == "/a/b"
    mapping = ac.FileSystemMapping("/srv/data/", "/data/")
    assert (mapping.source, mapping.target) == ("/srv/data", "/data")
    assert ac.FileSystemMapping("/srv/data/").target == "/srv/data"
    assert ac.Symlink("/bin/", "usr/bin").path == "/bin"
    assert ac.FileSystemMapping("/srv/data/") == ac.FileSystemMapping("/srv/data")
    assert ac.FileSystem("none", "/", "tmpfs").mount_point == "/"


def test_path_objects_are_accepted() -> None:
    """FileSystemMapping takes os.PathLike paths and stores str."""
    mapping = ac.FileSystemMapping(Path("/srv/data"), Path("/data"))  # type: ignore[arg-type]
    assert (mapping.source, mapping.target) == ("/srv/data", "/data")


def test_value_classes_are_frozen() -> None:
    """FileSystem, FileSystemMapping and Symlink cannot be changed after construction."""
    fs = ac.FileSystem("none", "/t", "tmpfs")
    mapping = ac.FileSystemMapping("/srv")
    link = ac.Symlink("/bin", "usr/bin")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fs.mount_point = "/elsewhere"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        mapping.writable = True  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        link.target = "elsewhere"  # type: ignore[misc]


def test_value_classes_are_hashable() -> None:
    """Equal values hash equal: they can be set members and dict keys."""
    items = {
        ac.FileSystem("none", "/t", "tmpfs", flags={"no-exec"}),
        ac.FileSystem("none", "/t/", "tmpfs", flags=["no-exec"]),
        ac.FileSystemMapping("/srv"),
        ac.FileSystemMapping("/srv", "/srv"),
        ac.Symlink("/bin", "usr/bin"),
        ac.Symlink("/bin", "usr/bin"),
    }
    assert len(items) == 3
    assert hash(ac.FileSystemMapping("/srv")) == hash(ac.FileSystemMapping("/srv/"))
    assert ac.FileSystemMapping("/srv") != ac.FileSystemMapping("/srv", writable=True)


def test_stock_lists() -> None:
    """CONTAINER_FILE_SYSTEMS, NETWORK_FILE_MAPPINGS and WRITABLE_TMP hold what Guix's do."""
    assert [(fs.mount_point, fs.type) for fs in ac.CONTAINER_FILE_SYSTEMS] == [
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/dev/mqueue", "mqueue"),
    ]
    assert "newinstance" in (ac.CONTAINER_FILE_SYSTEMS[0].options or "")
    assert [(m.source, m.target, m.writable) for m in ac.NETWORK_FILE_MAPPINGS] == [
        ("/etc/resolv.conf", "/etc/resolv.conf", False),
        ("/etc/nsswitch.conf", "/etc/nsswitch.conf", False),
        ("/etc/services", "/etc/services", False),
        ("/etc/hosts", "/etc/hosts", False),
    ]
    assert (ac.WRITABLE_TMP.mount_point, ac.WRITABLE_TMP.type) == ("/tmp", "tmpfs")
    assert "read-only" not in ac.WRITABLE_TMP.flags
    assert all(
        isinstance(item, ac.Symlink) or os.path.exists(item.source)
        for item in ac.HOST_SYSTEM_MAPPINGS
        if not isinstance(item, ac.FileSystem)
    )
    assert all(
        item.writable is False
        for item in ac.HOST_SYSTEM_MAPPINGS
        if isinstance(item, ac.FileSystemMapping)
    )
