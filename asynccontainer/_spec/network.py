"""`network=`: the modes a container's network may have, and the veth pair's description.

The pair itself is made and deleted by the fork server (`_forkserver.veth`).
"""

from __future__ import annotations

import errno
import ipaddress
import os

import attrs

__all__ = ["NETWORK_MODES", "VethNetwork", "check_network"]

NETWORK_MODES = ("veth",)


@attrs.frozen
class VethNetwork:
    """The veth pair of a container started with `network="veth"`.

    Attributes:
        host_interface: the host end's name (`acv<PID>`), in the host's
            network namespace.
        host_address: its address, such as "10.213.0.1"; the container's
            default gateway.
        container_address: the container's `eth0` address, such as
            "10.213.0.2": connect here from the host to reach a server in
            the container.
        prefixlen: 30.
    """

    host_interface: str
    host_address: str
    container_address: str
    prefixlen: int = 30

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        """The pair's /30."""
        return ipaddress.IPv4Interface(f"{self.host_address}/{self.prefixlen}").network


def check_network(network: str | None, namespaces: frozenset[str]) -> str | None:
    """Check `network=` in the caller, before anything is spawned.

    Raises:
        TypeError, ValueError: for a mode other than None or "veth", or
            "veth" without the "net" namespace.
        PermissionError: "veth" without root (the host end is made in the
            host's network namespace, which takes CAP_NET_ADMIN there).
        ModuleNotFoundError: "veth" without pyroute2 installed.
    """
    if network is None:
        return None
    if not isinstance(network, str):
        raise TypeError(f"network is None or 'veth', not {network!r}")
    if network not in NETWORK_MODES:
        raise ValueError(f"network {network!r} is not supported; give None or 'veth'")
    if "net" not in namespaces:
        raise ValueError(
            "network='veth' connects the container's own network namespace to the host; "
            "add 'net' to namespaces"
        )
    if os.geteuid() != 0:
        raise PermissionError(
            errno.EPERM,
            "network='veth' creates an interface in the host's network namespace, which "
            "only root (CAP_NET_ADMIN) may do",
        )
    import importlib.util

    if importlib.util.find_spec("pyroute2") is None:
        raise ModuleNotFoundError(
            "network='veth' needs pyroute2: pip install 'asynccontainer[network]'",
            name="pyroute2",
        )
    return network
