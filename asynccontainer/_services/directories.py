"""A service's runtime, state, cache and logs directories on the host (systemd's RuntimeDirectory=).

Each is made under its base (/run, /var/lib, /var/cache, /var/log) if
missing, the innermost directory owned by the service's user and group,
mode 0755 (the directories above it are root's, as systemd makes them),
and mapped writable into the container at the same path. Runtime
directories are removed when the service stops.

The innermost directory is the service's: a process of the service may
plant links in it, and may have planted them on an earlier run. So every
step walks by file descriptor from the base, with openat2 refusing any
link (RESOLVE_NO_SYMLINKS), so that nothing is made or chowned outside;
an existing directory above the innermost must be root's and writable by
no one else, or the service could swap it for a link between runs. The
removal is `shutil.rmtree`'s, which on Linux walks by fd and never
follows a link (`shutil.rmtree.avoids_symlink_attacks`).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

from .. import _kernel
from .spec import DIRECTORY_BASES

__all__ = ["make_directories", "remove_runtime_directories"]

_MODE = 0o755


def _open_below(parent: int, name: str) -> int:
    """Open the directory `name` in `parent`, making it if missing; never through a link."""
    try:
        os.mkdir(name, _MODE, dir_fd=parent)
    except FileExistsError:
        pass
    return _kernel.openat2(
        parent,
        name,
        os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW,
        _kernel.RESOLVE_NO_SYMLINKS | _kernel.RESOLVE_NO_MAGICLINKS | _kernel.RESOLVE_BENEATH,
    )


def _check_above(fd: int, path: str) -> None:
    """Refuse a directory above a service's own that is not root's alone (a link swap)."""
    info = os.fstat(fd)
    if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            errno.EPERM,
            f"{path} is not root's alone (owner uid {info.st_uid}, mode "
            f"{stat.filemode(info.st_mode)}): a service's directory is not made below it, "
            "since whoever may write it could swap it for a link",
            path,
        )


def make_directories(base: str, name: str, uid: int | None, gid: int | None) -> str:
    """Make `base`/`name` (each part missing made root's, the last the service's); return its path.

    Raises:
        PermissionError: this process may not make it (not root), or a
            directory on the way is not root's alone.
        OSError: a link, or something else than a directory, on the way.
    """
    parts = name.split("/")
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    path = base
    try:
        for index, part in enumerate(parts):
            path = f"{path}/{part}"
            below = _open_below(fd, part)
            os.close(fd)
            fd = below
            if index < len(parts) - 1:
                _check_above(fd, path)
        # As systemd: the innermost is the service's, whatever it was before.
        os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        os.fchmod(fd, _MODE)
    except OSError as exc:
        exc.filename = path  # the whole host path, not the part openat2 was given
        raise
    finally:
        os.close(fd)
    return path


def remove_runtime_directories(names: tuple[str, ...]) -> None:
    """Remove the service's runtime directories (the innermost of each), never through a link."""
    for name in names:
        try:
            shutil.rmtree(f"{DIRECTORY_BASES['runtime_directories']}/{name}")
        except FileNotFoundError:
            pass
