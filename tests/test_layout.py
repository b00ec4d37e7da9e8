"""The package's shape: public names report the public module; the fork server stays small.

The import contracts themselves (layers, and no anyio on the synchronous
side) are checked by `lint-imports` in `nox -s lint`; this checks what the
running processes actually load.
"""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys

import pytest
from capture import output_of

import asynccontainer as ac


def test_every_exported_class_and_function_reports_the_package() -> None:
    for name in ac.__all__:
        value = getattr(ac, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ == "asynccontainer", name


def test_a_public_class_pickles_by_its_public_path() -> None:
    spec = ac.ContainerSpec(hostname="box")
    data = pickle.dumps(spec)
    assert b"asynccontainer\x94" in data or b"casynccontainer\n" in data
    assert pickle.loads(data) == spec


def test_importing_the_package_loads_no_async_api() -> None:
    """`import asynccontainer` alone (as the fork server does) imports neither anyio nor trio."""
    code = (
        "import sys, asynccontainer, asynccontainer._forkserver.server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('anyio', 'trio', 'sniffio')))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout == "[]\n"


# Defined in a namespace no module holds, so that cloudpickle sends it by
# value and unpickling imports nothing: what it sees is the server's own.
_PROBE = eval(
    "lambda: print(sorted(m for m in __import__('sys').modules if m.startswith(("
    "'anyio', 'trio', 'sniffio', 'asynccontainer._core', 'asynccontainer._forkserver.server'))))",
    {"__name__": "probe"},
)


async def test_the_fork_server_has_no_async_api_loaded() -> None:
    """A callable target is a fork of the fork server: its sys.modules is the server's."""
    returncode, out = await output_of(_PROBE)
    # The server's own module is there (the probe sees the server's modules); no async API.
    assert (returncode, out) == (0, "['asynccontainer._forkserver.server']\n")


def test_the_fork_server_starts_without_attrs() -> None:
    """Its start imports no attrs, inspect or platform: a first container waits for it.

    Measured: attrs alone cost the first container of a process about 15 ms
    (docs/performance.md, item 13).
    """
    code = (
        "import sys, asynccontainer._forkserver.server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('attrs', 'attr', 'inspect', 'platform', 'pathlib', 'cloudpickle')))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout == "[]\n"


def test_the_version_is_defined_once_and_the_license_ships() -> None:
    """pyproject.toml reads the version from the package; LICENSE is in the metadata."""
    from importlib import metadata
    from pathlib import Path

    assert metadata.version("asynccontainer") == ac.__version__
    assert "LICENSE" in (metadata.metadata("asynccontainer").get_all("License-File") or [])
    root = Path(__file__).resolve().parent.parent
    assert "GNU GENERAL PUBLIC LICENSE" in (root / "LICENSE").read_text()
    assert 'dynamic = ["version"]' in (root / "pyproject.toml").read_text()


@pytest.mark.parametrize("kind", [ac.Container, ac.Service])
def test_handles_have_no_public_constructor(kind: type) -> None:
    with pytest.raises(TypeError, match="is not constructed directly"):
        kind(1, 2, 3)
