"""A first container: a shell in a fresh root, under asyncio (and trio, if installed).

Run it with:  python examples/hello.py
"""

import anyio

import asynccontainer as ac


async def main() -> None:
    """Run one container and print its exit status."""
    # A fresh tmpfs root with the host's programs mapped read-only, every
    # namespace new: uid 0 inside, PID 1, its own host name.
    status = await ac.call_with_container(
        ["sh", "-c", 'echo "hello from $(hostname): uid $(id -u), pid $$, root: $(echo /*)"'],
        mounts=ac.HOST_SYSTEM_MAPPINGS,
        hostname="box",
    )
    print(f"the container exited with status {status}")


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
    try:
        import trio  # noqa: F401 - an extra: pip install ".[trio]"; asyncio comes with anyio
    except ImportError:
        print("(trio is not installed: pip install '.[trio]' to run it under trio too)")
    else:
        anyio.run(main, backend="trio")
