"""What comes back from inside a container is data, never code run in the caller.

An excursion joins the container's namespaces, so its process is in the
container's hands: a module it imports lazily there (an encoding, say) is
the container's file, and whatever runs in it can write any reply on the
handshake socket. The caller once unpickled that reply: a forged pickle ran
code in the caller, root or not. Now excursions import nothing once inside,
and every reply from inside (values, exceptions, set-up errors) is decoded
as plain data and exceptions of classes the caller has already imported;
anything else is `ac.UntrustedValueError`, unless `trusted=True` asks for
full unpickling. (API.md, "Untrusted data and hostile containers".)
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from capture import forge_reply, output_of

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


@pytest.fixture
async def box() -> AsyncIterator[ac.Container]:
    async with await ac.run_container(
        ["sleep", "60"], mounts=SYSTEM, writable_root=True, stdin=None
    ) as container:
        yield container


async def test_a_forged_excursion_reply_runs_nothing_in_the_caller(
    box: ac.Container, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ac.UntrustedValueError, match=r"(os|posix)\.system"):
        await ac.container_excursion_value(box, lambda: forge_reply(str(marker)))
    assert not marker.exists()


async def test_trusted_values_are_unpickled_fully(box: ac.Container) -> None:
    """trusted=True is the opt-in: a value of any class comes back (and could run code)."""
    value = await ac.container_excursion_value(box, lambda: Path("/x"), trusted=True)
    assert value == Path("/x")
    with pytest.raises(ac.UntrustedValueError, match="pathlib"):
        await ac.container_excursion_value(box, lambda: Path("/x"))


PLANTED = """
import os
os.close(os.open({marker!r}, os.O_CREAT | os.O_WRONLY, 0o644))

def getregentry():
    raise LookupError("planted")
"""


async def test_an_excursion_imports_nothing_from_the_container(
    box: ac.Container, tmp_path: Path
) -> None:
    """The container plants a module where the caller's path points; the excursion never runs it."""
    marker = tmp_path / "imported"
    encodings = os.path.dirname(__import__("encodings").__file__)
    planted = PLANTED.format(marker=str(marker))

    def plant() -> None:
        os.makedirs(encodings, exist_ok=True)
        with open(os.path.join(encodings, "asynccontainer_planted.py"), "w") as file:
            file.write(planted)
        # Inside, the marker path is the container's own: make it exist
        # there too, so a run of the planted module would leave a trace.
        os.makedirs(os.path.dirname(str(marker)), exist_ok=True)

    await ac.container_excursion_value(box, plant)

    def use_the_planted_encoding() -> str:
        try:
            "x".encode("asynccontainer_planted")
        except LookupError as exc:
            return f"refused: {exc}"
        return "encoded"

    answer = await ac.container_excursion_value(box, use_the_planted_encoding)
    assert str(answer).startswith("refused"), answer
    # Nothing ran inside either: the planted module would have made the marker there.
    seen = await ac.container_excursion_value(box, lambda: os.path.exists(str(marker)))
    assert seen is False
    assert not marker.exists()


class HostileError(Exception):
    """An exception class of this module: the caller has it, so it comes back as itself."""


async def test_exceptions_of_imported_classes_come_back_as_themselves(box: ac.Container) -> None:
    def fail() -> None:
        raise HostileError("from inside", 42)

    with pytest.raises(HostileError) as info:
        await ac.container_excursion_value(box, fail)
    assert info.value.args == ("from inside", 42)
    assert any("Raised in the container process" in note for note in info.value.__notes__)


async def test_an_exception_of_a_class_the_caller_lacks_is_untrusted(box: ac.Container) -> None:
    def fail() -> None:
        class Local(Exception):
            pass

        raise Local("made inside")

    with pytest.raises(ac.UntrustedValueError, match="Local") as info:
        await ac.container_excursion_value(box, fail)
    assert isinstance(info.value, ac.ContainerError)


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
async def test_keyboard_interrupt_and_system_exit_arrive_wrapped(
    box: ac.Container, raised: type
) -> None:
    def fail() -> None:
        raise raised("inside")

    with pytest.raises(ac.ContainerError) as info:
        await ac.container_excursion_value(box, fail)
    assert type(info.value.__cause__) is raised


async def test_hostile_exceptions_do_not_unwind_into_the_server(box: ac.Container) -> None:
    """An exception whose __reduce__ and __repr__ raise ends the excursion cleanly."""

    class Nasty(Exception):
        def __reduce__(self):
            raise RuntimeError("no reduce")

        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    def fail() -> None:
        raise Nasty("x")

    with pytest.raises(ac.ContainerError):
        await ac.container_excursion_value(box, fail)
    # The server and the container are fine afterwards.
    assert await ac.container_excursion_value(box, lambda: 1 + 1) == 2


async def test_plain_values_come_back() -> None:
    async with await ac.run_container(["sleep", "60"], mounts=SYSTEM) as container:
        value = {
            "n": None,
            "b": True,
            "i": 2**70,
            "f": 1.5,
            "c": 1 + 2j,
            "s": "é",
            "y": b"\0",
            "a": bytearray(b"x"),
            "t": (1, [2, {3}], frozenset({4})),
        }
        assert await ac.container_excursion_value(container, lambda: value) == value


async def test_a_set_up_error_of_a_populate_hook_is_data_too(tmp_path: Path) -> None:
    """The populate hook runs inside the container's root: what it raises is decoded as data."""
    marker = tmp_path / "pwned"

    def populate() -> None:
        forge_reply(str(marker))

    with pytest.raises((ac.ContainerError, OSError)):
        await output_of(["true"], mounts=SYSTEM, populate=populate)
    assert not marker.exists()


assert sys.version_info >= (3, 11)
