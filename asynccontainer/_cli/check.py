"""What this kernel supports, for `asynccontainer check`.

Each check does the real thing in a throw-away child process (unshare a
namespace, open a pidfd ...) rather than reading version numbers, and each
missing piece comes with what to change.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TextIO

import attrs

from .. import _kernel
from .._plan import encode
from .._spec.namespaces import (
    NAMESPACES,
    namespace_clone_flags,
    setgroups_supported,
    unprivileged_user_namespace_supported,
)

__all__ = ["Finding", "findings", "report"]

_NOBODY = 65534


@attrs.frozen
class Finding:
    """One line of the report: what was checked, whether it works, and what to do if not."""

    what: str
    ok: bool
    detail: str = ""
    fix: str = ""
    required: bool = True


def _in_child(attempt: object, *, as_user: int | None = None) -> int:
    """Run `attempt()` in a forked child; return 0 if it worked, else the errno it met."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if as_user is not None:
                os.setgroups([])
                os.setgid(as_user)
                os.setuid(as_user)
            attempt()  # type: ignore[operator]
        except OSError as exc:
            code = exc.errno or 1
        except BaseException:
            code = 255
        os._exit(min(code, 255))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _unshare(flags: int) -> object:
    return lambda: _kernel.unshare(flags)


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def _cgroup_version() -> Finding:
    v1 = v2 = False
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fstype = line.split(" - ", 1)[1].split()[0]
            if fstype == "cgroup2":
                v2 = True
            elif fstype == "cgroup":
                v1 = True
    if v2 and not v1:
        return Finding("cgroup version", True, "v2 (unified)", required=False)
    if v1:
        detail = "v1 controllers" + (" plus a v2 hierarchy (hybrid)" if v2 else "")
        return Finding(
            "cgroup version",
            True,
            detail,
            "cgroup limits work best with v2: boot with systemd.unified_cgroup_hierarchy=1",
            required=False,
        )
    return Finding("cgroup version", False, "no cgroup file system mounted", required=False)


def _missing(name: str, call: Callable[[], int | None]) -> list[str]:
    """Return [name] if `call` fails with ENOSYS; close the fd it returns."""
    try:
        fd = call()
    except OSError as exc:
        return [name] if exc.errno == errno.ENOSYS else []
    if fd is not None:
        os.close(fd)
    return []


def _mount_by_fd() -> Finding:
    """Check the calls the set-up mounts with: openat2 (5.6), open_tree, mount_setattr (5.12)."""
    from .._kernel import mounts as _mounts

    def setattr_nothing() -> None:
        # No change asked: only ENOSYS says the call is missing (EPERM
        # without privilege is expected, and harmless).
        fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
        try:
            _mounts.mount_setattr(fd, recursive=False)
        finally:
            os.close(fd)

    missing = [
        *_missing("openat2", lambda: _kernel.openat2(_kernel.AT_FDCWD, "/", os.O_PATH, 0)),
        *_missing("open_tree", lambda: _mounts.open_tree(_kernel.AT_FDCWD, "/", 0)),
        *_missing("mount_setattr", setattr_nothing),
    ]
    return Finding(
        "mounts by file descriptor (openat2, open_tree, mount_setattr)",
        not missing,
        f"missing: {', '.join(missing)}" if missing else "",
        "needs Linux 5.12 or later",
    )


def findings() -> list[Finding]:
    """Check everything asynccontainer relies on; return one Finding per item."""
    root = os.geteuid() == 0
    user_flag = 0 if root else _kernel.CLONE_NEWUSER
    result: list[Finding] = []
    for name in NAMESPACES:
        flags = namespace_clone_flags([name]) | user_flag
        err = _in_child(_unshare(flags))
        fix = f"the kernel needs CONFIG_{name.upper()}_NS" if name != "mnt" else ""
        if err == errno.ENOSPC:
            fix = f"raise /proc/sys/user/max_{name}_namespaces (sysctl user.max_{name}_namespaces)"
        result.append(
            Finding(f"{name} namespace", err == 0, "" if err == 0 else os.strerror(err), fix)
        )

    # Unprivileged user namespaces: tried for real as nobody when root.
    limit = _read("/proc/sys/user/max_user_namespaces")
    apparmor = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if root:
        err = _in_child(_unshare(_kernel.CLONE_NEWUSER), as_user=_NOBODY)
        works = err == 0
    else:
        works = result[NAMESPACES.index("user")].ok
        err = 0 if works else errno.EPERM
    fix = ""
    if not works:
        if limit == "0":
            fix = "sysctl -w user.max_user_namespaces=15000"
        elif not unprivileged_user_namespace_supported():
            fix = "sysctl -w kernel.unprivileged_userns_clone=1"
        elif apparmor == "1":
            fix = "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
        else:
            fix = "check the security module's policy on user namespaces"
    result.append(
        Finding(
            "unprivileged user namespaces",
            works,
            "" if works else os.strerror(err),
            fix,
            required=not root,
        )
    )
    result.append(
        Finding(
            "setgroups control (/proc/PID/setgroups)",
            setgroups_supported(),
            "",
            "needs Linux 3.19 or later",
        )
    )
    try:
        os.close(_kernel.pidfd_open(os.getpid()))
        result.append(Finding("pidfd (race-free signals)", True))
    except OSError as exc:
        result.append(
            Finding("pidfd (race-free signals)", False, exc.strerror or "", "needs Linux 5.3")
        )
    result.append(_mount_by_fd())
    from .._kernel import seccomp as _libseccomp

    result.append(
        Finding(
            "seccomp filters (libseccomp)",
            _libseccomp.LIB is not None,
            "",
            "install libseccomp (apt-get install libseccomp2), or pass seccomp=None",
        )
    )
    result.append(_cgroup_version())
    result.append(_executor())
    return result


def _executor() -> Finding:
    """Say which executor runs the plans of command containers (the C one, where built)."""
    try:
        chosen = encode.chosen_executor()
    except ValueError as exc:
        return Finding("executor", False, str(exc), "", required=False)
    if chosen == "c":
        return Finding("executor", True, "C (command targets; callables run in Python)")
    if encode.LIBRARY.exists():
        return Finding("executor", True, f"Python ({encode.EXECUTOR_VARIABLE}=python)")
    return Finding(
        "executor",
        True,
        "Python (the C executor was not built)",
        "reinstall with a C compiler present for faster starts",
        required=False,
    )


def report(out: TextIO) -> int:
    """Print the findings; return 0 if every required piece works, else 1."""
    items = findings()
    width = max(len(item.what) for item in items)
    for item in items:
        mark = "ok" if item.ok else ("MISSING" if item.required else "missing")
        line = f"{mark:8} {item.what.ljust(width)}"
        if item.detail:
            line += f"  {item.detail}"
        out.write(line.rstrip() + "\n")
        if item.fix and (not item.ok or not item.required):
            out.write(f"{'':8} {'':{width}}  -> {item.fix}\n")
    missing = [item for item in items if item.required and not item.ok]
    if missing:
        out.write(f"\n{len(missing)} required piece(s) missing: see the lines marked MISSING.\n")
        return 1
    out.write("\nEverything asynccontainer needs is here.\n")
    return 0
