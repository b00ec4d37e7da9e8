"""`network=`: the modes a container's network may have, and the veth pair's description.

The pair itself is made and deleted by the fork server (`_forkserver.veth`).
"""

from __future__ import annotations

import ipaddress

import attrs

__all__ = ["NETWORK_MODES", "VethNetwork"]

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
