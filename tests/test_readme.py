"""The README's examples run as written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import anyio

import asynccontainer as ac

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_first_example_runs() -> None:
    # It calls anyio.run itself, so it runs outside any event loop.
    exec(compile(BLOCKS[0], "README.md", "exec"), {"__name__": "readme"})


async def test_excursion_and_pid_file_example() -> None:
    namespace: dict[str, object] = {"ac": ac, "anyio": anyio}
    body = textwrap.indent(BLOCKS[1], "    ")
    exec(
        compile(f"async def example():\n{body}\n    return daemon", "README.md", "exec"), namespace
    )
    daemon = await namespace["example"]()  # type: ignore[operator]
    assert isinstance(daemon, int) and daemon > 0


async def test_service_group_example(tmp_path: object) -> None:
    namespace: dict[str, object] = {"ac": ac, "anyio": anyio}
    body = textwrap.indent(BLOCKS[2].replace("/tmp/web.log", f"{tmp_path}/web.log"), "    ")
    source = f"async def example():\n{body}\n    return web"
    exec(compile(source, "README.md", "exec"), namespace)
    web = await namespace["example"]()  # type: ignore[operator]
    assert web.returncode is not None  # stopped when the block was left
    assert "Serving HTTP" in (tmp_path / "web.log").read_text()  # type: ignore[operator]
