"""A veth pair between the host and a container, made by the fork server (`network="veth"`).

The fork server makes it, between the clone and the go, with netlink
through pyroute2 (imported on the first such request, in the server only):

- the pair, with its host end `acv<PID>` in the host's network namespace
  and its peer `eth0` created straight in the container's (the kernel's
  IFLA_NET_NS_PID);
- the host end gets the /30's first address; the container end, configured
  from a netlink socket opened in the container's namespace, the second,
  and a default route through the host end.

It is deleted when the server reaps the container: deleting one end of a
veth pair deletes both (veth(4)), and the kernel would do it too once the
namespace is gone, but later, from a work queue.

Subnets come from 10.213.0.0/16 (16384 of them), skipping any that overlaps
an address the host already has.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterator, Set
from contextlib import contextmanager
from typing import Any

from .. import _kernel
from .._spec.network import VethNetwork

__all__ = ["create_veth", "delete_veth"]

_POOL = ipaddress.IPv4Network("10.213.0.0/16")
_CONTAINER_INTERFACE = "eth0"


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


@contextmanager
def _in_network_namespace(pid: int) -> Iterator[None]:
    """Run the block in the network namespace of `pid`, then come back.

    The server is single-threaded, so the switch holds for all it does
    meanwhile; failing to come back would leave every later container in
    the wrong namespace, so the server then exits.
    """
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _kernel.setns(target, _kernel.CLONE_NEWNET)
        finally:
            os.close(target)
        try:
            yield
        finally:
            try:
                _kernel.setns(home, _kernel.CLONE_NEWNET)
            except OSError:
                os._exit(70)  # EX_SOFTWARE: the callers see the server die
    finally:
        os.close(home)


def _free_subnet(ipr: Any, taken: Set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    in_use = [
        ipaddress.IPv4Interface(f"{message.get_attr('IFA_ADDRESS')}/{message['prefixlen']}")
        for message in ipr.get_addr(family=2)
    ]
    for subnet in _POOL.subnets(new_prefix=30):
        if subnet in taken:
            continue
        if any(address.network.overlaps(subnet) for address in in_use):
            continue
        return subnet
    raise OSError(errno.EADDRNOTAVAIL, f"no free /30 left in {_POOL} for a veth pair")


def create_veth(pid: int, taken: Set[ipaddress.IPv4Network]) -> VethNetwork:
    """Give the container `pid` a veth pair to the host, on a /30 not in `taken`.

    Raises:
        OSError: from netlink (EEXIST, EPERM ...), or EADDRNOTAVAIL when the
            pool is exhausted; whatever was made is deleted first.
    """
    host_interface = f"acv{pid}"
    with _iproute() as ipr:
        subnet = _free_subnet(ipr, taken)
        host, container = list(subnet.hosts())
        ipr.link(
            "add",
            ifname=host_interface,
            kind="veth",
            peer={"ifname": _CONTAINER_INTERFACE, "net_ns_pid": pid},
        )
        try:
            (index,) = ipr.link_lookup(ifname=host_interface)
            ipr.addr("add", index=index, address=str(host), prefixlen=30)
            ipr.link("set", index=index, state="up")
            with _in_network_namespace(pid), _iproute() as inside:
                (peer,) = inside.link_lookup(ifname=_CONTAINER_INTERFACE)
                inside.addr("add", index=peer, address=str(container), prefixlen=30)
                inside.link("set", index=peer, state="up")
                inside.route("add", dst="0.0.0.0/0", gateway=str(host))
        except BaseException:
            delete_veth(host_interface)
            raise
    return VethNetwork(host_interface, str(host), str(container))


def delete_veth(host_interface: str) -> None:
    """Delete a pair by its host end; nothing if it is already gone."""
    with _iproute() as ipr:
        for index in ipr.link_lookup(ifname=host_interface):
            ipr.link("del", index=index)
