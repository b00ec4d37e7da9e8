"""File systems a container mounts: the value classes and the stock lists.

These are plain, frozen values, checked when they are made, so that a bad
mount point is a `ValueError` in the caller's own line rather than an error
from inside a half-built container. The mounting itself is in `_mount`.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from typing import Any

import attrs

from .. import _kernel

__all__ = [
    "CONTAINER_FILE_SYSTEMS",
    "HOST_SYSTEM_MAPPINGS",
    "MOUNT_FLAGS",
    "NETWORK_FILE_MAPPINGS",
    "WRITABLE_TMP",
    "FileSystem",
    "FileSystemMapping",
    "MountItem",
    "Symlink",
]

MOUNT_FLAGS: dict[str, int] = {
    "read-only": _kernel.MS_RDONLY,
    "bind-mount": _kernel.MS_BIND,
    "no-suid": _kernel.MS_NOSUID,
    "no-dev": _kernel.MS_NODEV,
    "no-exec": _kernel.MS_NOEXEC,
    "no-atime": _kernel.MS_NOATIME,
    "no-diratime": _kernel.MS_NODIRATIME,
    "strict-atime": _kernel.MS_STRICTATIME,
    "relative-atime": _kernel.MS_RELATIME,
    "lazy-time": _kernel.MS_LAZYTIME,
    "private": _kernel.MS_PRIVATE,
    "shared": _kernel.MS_SHARED,
    "slave": _kernel.MS_SLAVE,
    "unbindable": _kernel.MS_UNBINDABLE,
}
"""The flag names a `FileSystem` accepts, and the MS_* bit each stands for."""

# mount(2): a propagation type must be changed by a call of its own, with no
# other flag than MS_REC.
PROPAGATION_FLAGS = (
    _kernel.MS_PRIVATE | _kernel.MS_SHARED | _kernel.MS_SLAVE | _kernel.MS_UNBINDABLE
)


def _absolute_path(what: str) -> Any:
    """Make a validator that wants a normalized absolute path."""

    def check(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{what} must be a str path, not {value!r}")
        if not value.startswith("/"):
            raise ValueError(
                f"{what} {value!r} is relative; give an absolute path such as "
                f"{'/' + value.lstrip('./')!r}"
            )
        if ".." in value.split("/"):
            raise ValueError(f"{what} {value!r} contains '..'; give it without '..'")
        _no_nul(what, value)

    return check


def _no_nul(what: str, value: str) -> None:
    # A C string ends at NUL: the kernel would see another path than the one given.
    if "\0" in value:
        raise ValueError(f"{what} {value!r} contains a NUL byte")


def _text(what: str) -> Any:
    """Make a validator of a str without NUL bytes."""

    def check(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{what} must be a str, not {value!r}")
        _no_nul(what, value)

    return check


def _normalize(path: str | os.PathLike[str]) -> str:
    """Return os.fspath(path) with doubled and trailing slashes removed."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"paths are str, not {text!r}")
    if text.startswith("/"):
        # normpath also folds "..", which the validator must still see.
        return "/" + "/".join(part for part in text.split("/") if part not in ("", "."))
    return text


def _flag_set(flags: Iterable[str]) -> frozenset[str]:
    if isinstance(flags, str):
        raise TypeError(f"flags must be an iterable of names, not the string {flags!r}")
    names = frozenset(flags)
    unknown = sorted(name for name in names if name not in MOUNT_FLAGS)
    if unknown:
        raise ValueError(
            f"unknown mount flag(s) {', '.join(map(repr, unknown))}; "
            f"choose among {', '.join(sorted(MOUNT_FLAGS))}"
        )
    return names


@attrs.frozen
class FileSystem:
    """A file system to mount in the container, as Guix's `file-system` record.

    Args:
        device: what to mount: a path for bind mounts and block devices, or a
            name such as "none" or "tmpfs" for virtual file systems.
        mount_point: absolute path inside the container; it is created
            (as a directory, or an empty file for a bind mount of a file).
        type: the file system type ("tmpfs", "proc", "devpts" ...) or "none"
            for bind mounts.
        flags: names from `MOUNT_FLAGS`: "read-only", "bind-mount",
            "no-suid", "no-dev", "no-exec", "no-atime", "strict-atime",
            "private" ...
        options: the file-system-specific option string (mount(8)'s -o).
        check: must be False: asynccontainer never runs fsck before mounting.

    Raises:
        ValueError: for a relative mount point, one containing "..", an
            unknown flag, or check=True.
        TypeError: for values of the wrong type.
    """

    device: str = attrs.field(validator=_text("device"))
    mount_point: str = attrs.field(converter=_normalize, validator=_absolute_path("mount point"))
    type: str = attrs.field(validator=_text("type"))
    flags: frozenset[str] = attrs.field(default=frozenset(), converter=_flag_set)
    options: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_text("options"))
    )
    check: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.is_bind_mount and not self.device.startswith("/"):
            # It would be resolved against the fork server's working directory.
            raise ValueError(
                f"the source {self.device!r} of a bind mount is relative; give an absolute path"
            )

    @check.validator
    def _no_fsck(self, attribute: attrs.Attribute[bool], value: bool) -> None:
        if value:
            raise ValueError(
                "check=True asks for fsck before mounting, which asynccontainer does not do; "
                "check the device beforehand and pass check=False"
            )

    @property
    def is_bind_mount(self) -> bool:
        """True if this is a bind mount of a host path (flag "bind-mount")."""
        return "bind-mount" in self.flags

    def mount_flags(self) -> int:
        """Return the MS_* bits of `flags`, propagation bits excluded."""
        bits = 0
        for name in self.flags:
            bits |= MOUNT_FLAGS[name]
        return bits & ~PROPAGATION_FLAGS

    def propagation_flags(self) -> int:
        """Return the propagation MS_* bits of `flags` (0 when none is asked)."""
        bits = 0
        for name in self.flags:
            bits |= MOUNT_FLAGS[name]
        return bits & PROPAGATION_FLAGS


@attrs.frozen
class FileSystemMapping:
    """A host path made visible in the container, as Guix's `file-system-mapping`.

    Args:
        source: absolute host path (a file or a directory).
        target: absolute path in the container; defaults to `source`.
        writable: if False (the default) the mapping is read-only.

    Raises:
        ValueError: for relative paths or paths containing "..".
    """

    source: str = attrs.field(converter=_normalize, validator=_absolute_path("mapping source"))
    target: str = attrs.field(  # type: ignore[assignment]  # None becomes source
        default=None,
        converter=attrs.converters.optional(_normalize),
        validator=attrs.validators.optional(_absolute_path("mapping target")),
    )
    writable: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.target is None:
            object.__setattr__(self, "target", self.source)

    def to_bind_mount(self) -> FileSystem:
        """Return the `FileSystem` that bind-mounts `source` on `target`."""
        flags = {"bind-mount"} if self.writable else {"bind-mount", "read-only"}
        return FileSystem(
            device=self.source, mount_point=self.target, type="none", flags=frozenset(flags)
        )


@attrs.frozen
class Symlink:
    """A symbolic link made in the container: `path` pointing to `target`.

    `HOST_SYSTEM_MAPPINGS` uses it to recreate links such as /bin -> usr/bin
    as links rather than as second mounts of the same directory.

    Raises:
        ValueError: for a relative `path`.
    """

    path: str = attrs.field(converter=_normalize, validator=_absolute_path("symlink path"))
    target: str = attrs.field(validator=_text("symlink target"))


MountItem = FileSystem | FileSystemMapping | Symlink
"""What a `mounts=` argument may hold."""

CONTAINER_FILE_SYSTEMS: tuple[FileSystem, ...] = (
    # No gid=5 option: group 5 is usually not mapped into a user namespace,
    # and devpts then refuses the mount with EINVAL.
    FileSystem(
        "none",
        "/dev/pts",
        "devpts",
        flags=frozenset({"no-suid", "no-exec"}),
        options="newinstance,ptmxmode=0666,mode=0620",
    ),
    FileSystem(
        "none",
        "/dev/shm",
        "tmpfs",
        flags=frozenset({"no-exec", "no-suid", "no-dev"}),
        options="mode=1777,size=65536k",
    ),
    FileSystem("none", "/dev/mqueue", "mqueue", flags=frozenset({"no-exec", "no-suid", "no-dev"})),
)
"""Guix's %container-file-systems: /dev/pts (a new devpts instance), /dev/shm, /dev/mqueue."""

NETWORK_FILE_MAPPINGS: tuple[FileSystemMapping, ...] = (
    # Read-only, unlike Guix's: a root caller's container could otherwise
    # rewrite the host's resolver configuration.
    FileSystemMapping("/etc/resolv.conf"),
    FileSystemMapping("/etc/nsswitch.conf"),
    FileSystemMapping("/etc/services"),
    FileSystemMapping("/etc/hosts"),
)
"""Guix's %network-file-mappings: what a program needs to resolve host names, read-only."""

WRITABLE_TMP = FileSystem(
    "none", "/tmp", "tmpfs", flags=frozenset({"no-suid", "no-dev"}), options="mode=1777"
)
"""A fresh, writable tmpfs on /tmp."""

_HOST_PROGRAM_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/gnu/store",
    "/nix/store",
)


def host_system_mappings(paths: Iterable[str] = _HOST_PROGRAM_PATHS) -> tuple[MountItem, ...]:
    """Return read-only mappings of those `paths` that exist on this host.

    A path that is a symbolic link (merged /usr makes /bin -> usr/bin) is
    returned as a `Symlink` with the same target, so the container's layout
    matches the host's and each directory is mounted once.
    """
    items: list[MountItem] = []
    for path in paths:
        if os.path.islink(path):
            link = os.readlink(path)
            # A link pointing outside the mapped set would dangle; map what
            # it resolves to instead.
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), link))
            if any(resolved == p or resolved.startswith(p + "/") for p in paths):
                items.append(Symlink(path, link))
            elif os.path.exists(path):
                items.append(FileSystemMapping(os.path.realpath(path), path))
        elif os.path.exists(path):
            items.append(FileSystemMapping(path))
    return tuple(items)


HOST_SYSTEM_MAPPINGS: tuple[MountItem, ...] = host_system_mappings()
"""Read-only mappings of the host's program directories (/usr, /bin, /lib ...).

With it, commands such as `sh` run inside a fresh tmpfs root. It plays the
role of Guix's %store-mapping. Computed when asynccontainer is imported.
"""
