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

from types import FunctionType
from typing import TYPE_CHECKING

# The names below are imported on first use (PEP 562), so that the fork
# server, which imports `asynccontainer._forkserver.server`, loads only the synchronous
# modules it needs and never the async API (anyio): it stays small, and
# cloning it stays cheap.
_EXPORTS = {
    "shutdown_fork_server": "_core.client",
    "Container": "_core.container",
    "Target": "_plan.build",
    "ContainerSpec": "_spec.container",
    "ContainerOptions": "_spec.container",
    "call_with_container": "_core.container",
    "run_container": "_core.container",
    "ALL_CAPABILITIES": "_spec.capabilities",
    "DEFAULT_CAPABILITIES": "_spec.capabilities",
    "ResourceUsage": "_spec.limits",
    "VethNetwork": "_spec.network",
    "ContainerError": "_errors",
    "OutputLimitError": "_errors",
    "PidFileTimeoutError": "_errors",
    "ServiceStartError": "_errors",
    "ContainerProcessError": "_core.process",
    "open_process": "_core.process",
    "run_process": "_core.process",
    "Stdio": "_core.container",
    "HasFileno": "_core.container",
    "UntrustedValueError": "_errors",
    "container_excursion": "_core.excursion",
    "container_excursion_value": "_core.excursion",
    "CONTAINER_FILE_SYSTEMS": "_spec.filesystems",
    "HOST_SYSTEM_MAPPINGS": "_spec.filesystems",
    "MOUNT_FLAGS": "_spec.filesystems",
    "NETWORK_FILE_MAPPINGS": "_spec.filesystems",
    "WRITABLE_TMP": "_spec.filesystems",
    "FileSystem": "_spec.filesystems",
    "FileSystemMapping": "_spec.filesystems",
    "MountItem": "_spec.filesystems",
    "Symlink": "_spec.filesystems",
    "read_pid_file": "_core.pidfile",
    "DEFAULT_SECCOMP": "_spec.seccomp",
    "SeccompPolicy": "_spec.seccomp",
    "Endpoint": "_services.endpoint",
    "Service": "_services.group",
    "ServiceEvent": "_services.group",
    "ServiceEvents": "_services.group",
    "ServiceGroup": "_services.group",
    "ServiceSpec": "_services.spec",
    "UnknownAccountError": "_services.spec",
    "default_mounts": "_services.spec",
    "default_namespaces": "_services.spec",
    "NAMESPACES": "_spec.namespaces",
    "containers_supported": "_spec.namespaces",
    "setgroups_supported": "_spec.namespaces",
    "unprivileged_user_namespace_supported": "_spec.namespaces",
    "user_namespace_supported": "_spec.namespaces",
}


def _publish(value: object) -> None:
    """Make a class or function report `asynccontainer` as its module, as trio's names do.

    Its methods too: tracebacks, reprs and the docs then name the public
    path, never the private module the code happens to live in. Pickles
    refer to the public path, which loads the same object.
    """
    private = f"{__name__}."
    if not isinstance(value, (type, FunctionType)):
        return
    if value.__module__.startswith(private):
        value.__module__ = __name__
        members = vars(value).values() if isinstance(value, type) else ()
        for member in members:
            if isinstance(member, FunctionType) and member.__module__.startswith(private):
                member.__module__ = __name__


def __getattr__(name: str) -> object:
    import importlib

    if name == "to_container":
        # A module, as anyio.to_process: `ac.to_container.run_sync(fn)`.
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asynccontainer' has no attribute {name!r}")

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    _publish(value)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from . import to_container
    from ._core.client import shutdown_fork_server
    from ._core.container import Container, HasFileno, Stdio, call_with_container, run_container
    from ._core.excursion import container_excursion, container_excursion_value
    from ._core.pidfile import read_pid_file
    from ._core.process import ContainerProcessError, open_process, run_process
    from ._errors import (
        ContainerError,
        OutputLimitError,
        PidFileTimeoutError,
        ServiceStartError,
        UntrustedValueError,
    )
    from ._plan.build import Target
    from ._services.endpoint import Endpoint
    from ._services.group import Service, ServiceEvent, ServiceEvents, ServiceGroup
    from ._services.spec import ServiceSpec, UnknownAccountError, default_mounts, default_namespaces
    from ._spec.capabilities import ALL_CAPABILITIES, DEFAULT_CAPABILITIES
    from ._spec.container import ContainerOptions, ContainerSpec
    from ._spec.filesystems import (
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
    from ._spec.limits import ResourceUsage
    from ._spec.namespaces import (
        NAMESPACES,
        containers_supported,
        setgroups_supported,
        unprivileged_user_namespace_supported,
        user_namespace_supported,
    )
    from ._spec.network import VethNetwork
    from ._spec.seccomp import DEFAULT_SECCOMP, SeccompPolicy

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
    "ContainerOptions",
    "ContainerProcessError",
    "ContainerSpec",
    "Endpoint",
    "FileSystem",
    "FileSystemMapping",
    "HasFileno",
    "MountItem",
    "OutputLimitError",
    "PidFileTimeoutError",
    "ResourceUsage",
    "SeccompPolicy",
    "Service",
    "ServiceEvent",
    "ServiceEvents",
    "ServiceGroup",
    "ServiceSpec",
    "ServiceStartError",
    "Stdio",
    "Symlink",
    "Target",
    "UnknownAccountError",
    "UntrustedValueError",
    "VethNetwork",
    "call_with_container",
    "container_excursion",
    "container_excursion_value",
    "containers_supported",
    "default_mounts",
    "default_namespaces",
    "open_process",
    "read_pid_file",
    "run_container",
    "run_process",
    "setgroups_supported",
    "shutdown_fork_server",
    "to_container",
    "unprivileged_user_namespace_supported",
    "user_namespace_supported",
]
