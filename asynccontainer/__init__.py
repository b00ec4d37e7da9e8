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
from ._pidfile import read_pid_file
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
    "CONTAINER_FILE_SYSTEMS",
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
    "Service",
    "ServiceGroup",
    "ServiceSpec",
    "Symlink",
    "Target",
    "UnknownAccountError",
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
