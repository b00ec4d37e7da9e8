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
