"""network="veth": a veth pair to the host on a private /30, gone with the container."""

from __future__ import annotations

import os
import socket

import anyio
import pytest
from capture import output_of

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS
# Accepts one connection on port 8080 and answers with its own address.
SERVER = (
    "import socket\n"
    "s = socket.create_server(('0.0.0.0', 8080))\n"
    "print('listening', flush=True)\n"
    "c, _ = s.accept()\n"
    "c.sendall(c.getsockname()[0].encode())\n"
    "c.close()\n"
)


def interface_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


async def test_host_reaches_a_server_in_the_container() -> None:
    read_end, write_end = os.pipe()
    try:
        container = await ac.run_container(
            ["python3", "-c", SERVER], mounts=SYSTEM, network="veth", stdout=write_end
        )
    finally:
        os.close(write_end)
    async with container:
        network = container.network
        assert network is not None
        assert network.host_interface == f"acv{container.pid}"
        assert interface_exists(network.host_interface)
        with os.fdopen(read_end, "rb") as reader:
            assert await anyio.to_thread.run_sync(reader.readline) == b"listening\n"
        stream = await anyio.connect_tcp(network.container_address, 8080)
        async with stream:
            assert await stream.receive() == network.container_address.encode()
        assert await container.wait() == 0
    # Deleted before the exit is reported, not later by the kernel.
    assert not interface_exists(network.host_interface)


async def test_container_reaches_the_host_through_its_default_route() -> None:
    """The host end is the gateway: a listener on the host's end address answers."""
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    listener.setblocking(False)
    try:
        client = (
            "import socket, sys\n"
            "gateway = open('/proc/net/route').read().split()[13]\n"
            "address = socket.inet_ntoa(bytes.fromhex(gateway)[::-1])\n"
            f"socket.create_connection((address, {port}), timeout=10).sendall(b'hi')\n"
            "print(address)\n"
        )
        async with anyio.create_task_group() as group:
            received = []

            async def accept() -> None:
                await anyio.wait_readable(listener)
                connection, _ = listener.accept()
                with connection:
                    connection.setblocking(True)
                    received.append(await anyio.to_thread.run_sync(connection.recv, 16))

            group.start_soon(accept)
            returncode, out = await output_of(
                ["python3", "-c", client], mounts=SYSTEM, network="veth"
            )
        assert returncode == 0
        assert out.strip().startswith("10.213.")
        assert received == [b"hi"]
    finally:
        listener.close()


async def test_containers_get_different_subnets_and_only_loopback_without() -> None:
    first = await ac.run_container(["sleep", "60"], mounts=SYSTEM, network="veth")
    async with (
        first,
        await ac.run_container(["sleep", "60"], mounts=SYSTEM, network="veth") as second,
    ):
        assert first.network is not None and second.network is not None
        assert first.network.container_address != second.network.container_address
        assert first.network.host_interface != second.network.host_interface
    returncode, out = await output_of(["ls", "/sys/class/net"], mounts=SYSTEM)
    assert (returncode, out) == (0, "lo\n")


async def test_service_with_a_veth() -> None:
    spec = ac.ServiceSpec(
        ["sleep", "300"],
        namespaces=[*ac.default_namespaces(), "net"],
        network="veth",
        grace_period=1,
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert service.network is not None
        name = service.network.host_interface
        assert interface_exists(name)
        await service.stop()
    assert not interface_exists(name)


async def test_a_failed_start_leaves_no_interface() -> None:
    before = set(os.listdir("/sys/class/net"))
    with pytest.raises(FileNotFoundError):
        await ac.run_container(["no-such-program"], network="veth")
    assert set(os.listdir("/sys/class/net")) == before


async def test_bad_network_fails_before_anything_is_spawned() -> None:
    with pytest.raises(ValueError, match="add 'net'"):
        await ac.run_container(["true"], namespaces=["user", "mnt"], network="veth")
    with pytest.raises(ValueError, match="not supported"):
        await ac.run_container(["true"], network="bridge")
    with pytest.raises(TypeError, match="None or 'veth'"):
        await ac.run_container(["true"], network=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="add 'net'"):
        ac.ServiceSpec(["true"], network="veth")
