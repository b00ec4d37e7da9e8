"""asynccontainer: Linux containers and containerised services for async Python.

The async (anyio: asyncio and trio) counterpart of GNU Guix's
``(gnu build linux-container)``. Every container is cloned by a small fork
server exec'd on first use, so the caller is never forked; the caller
awaits each container's set-up on a socket of its own.

Everything public is importable from here::

    import asynccontainer as ac

    status = await ac.call_with_container(
        ["sh", "-c", "echo hello from $(hostname)"],
        mounts=ac.HOST_SYSTEM_MAPPINGS,
        hostname="box",
    )
"""

from typing import TYPE_CHECKING

# The names below are imported on first use (PEP 562), so that the fork
# server, which imports `asynccontainer._server`, loads only the synchronous
# modules it needs and never the async API (anyio): it stays small, and
# cloning it stays cheap.
_EXPORTS = {
    "shutdown_fork_server": "_client",
    "Container": "_container",
    "Target": "_container",
    "call_with_container": "_container",
    "run_container": "_container",
    "ALL_CAPABILITIES": "_capabilities",
    "DEFAULT_CAPABILITIES": "_capabilities",
    "ResourceUsage": "_cgroups",
    "VethNetwork": "_network",
    "ContainerError": "_errors",
    "container_excursion": "_excursion",
    "container_excursion_value": "_excursion",
    "CONTAINER_FILE_SYSTEMS": "_filesystems",
    "HOST_SYSTEM_MAPPINGS": "_filesystems",
    "MOUNT_FLAGS": "_filesystems",
    "NETWORK_FILE_MAPPINGS": "_filesystems",
    "WRITABLE_TMP": "_filesystems",
    "FileSystem": "_filesystems",
    "FileSystemMapping": "_filesystems",
    "MountItem": "_filesystems",
    "Symlink": "_filesystems",
    "read_pid_file": "_pidfile",
    "DEFAULT_SECCOMP": "_seccomp",
    "SeccompPolicy": "_seccomp",
    "Service": "_services",
    "ServiceGroup": "_services",
    "ServiceSpec": "_services",
    "UnknownAccountError": "_services",
    "default_mounts": "_services",
    "default_namespaces": "_services",
    "NAMESPACES": "_namespaces",
    "containers_supported": "_namespaces",
    "setgroups_supported": "_namespaces",
    "unprivileged_user_namespace_supported": "_namespaces",
    "user_namespace_supported": "_namespaces",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asynccontainer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from ._capabilities import ALL_CAPABILITIES, DEFAULT_CAPABILITIES
    from ._cgroups import ResourceUsage
    from ._client import shutdown_fork_server
    from ._container import Container, Target, call_with_container, run_container
    from ._errors import ContainerError
    from ._excursion import container_excursion, container_excursion_value
    from ._filesystems import (
        CONTAINER_FILE_SYSTEMS,
        HOST_SYSTEM_MAPPINGS,
        MOUNT_FLAGS,
        NETWORK_FILE_MAPPINGS,
        WRITABLE_TMP,
        FileSystem,
        FileSystemMapping,
        MountItem,
        Symlink,
    )
    from ._namespaces import (
        NAMESPACES,
        containers_supported,
        setgroups_supported,
        unprivileged_user_namespace_supported,
        user_namespace_supported,
    )
    from ._network import VethNetwork
    from ._pidfile import read_pid_file
    from ._seccomp import DEFAULT_SECCOMP, SeccompPolicy
    from ._services import (
        Service,
        ServiceGroup,
        ServiceSpec,
        UnknownAccountError,
        default_mounts,
        default_namespaces,
    )

__version__ = "0.1.0.dev0"

__all__ = [
    "ALL_CAPABILITIES",
    "CONTAINER_FILE_SYSTEMS",
    "DEFAULT_CAPABILITIES",
    "DEFAULT_SECCOMP",
    "HOST_SYSTEM_MAPPINGS",
    "MOUNT_FLAGS",
    "NAMESPACES",
    "NETWORK_FILE_MAPPINGS",
    "WRITABLE_TMP",
    "Container",
    "ContainerError",
    "FileSystem",
    "FileSystemMapping",
    "MountItem",
    "ResourceUsage",
    "SeccompPolicy",
    "Service",
    "ServiceGroup",
    "ServiceSpec",
    "Symlink",
    "Target",
    "UnknownAccountError",
    "VethNetwork",
    "call_with_container",
    "container_excursion",
    "container_excursion_value",
    "containers_supported",
    "default_mounts",
    "default_namespaces",
    "read_pid_file",
    "run_container",
    "setgroups_supported",
    "shutdown_fork_server",
    "unprivileged_user_namespace_supported",
    "user_namespace_supported",
]
