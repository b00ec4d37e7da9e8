"""Field checks shared by the spec classes: each written once, each naming the field.

attrs calls a validator with (instance, attribute, value), which names the
field. A converter gets the value alone, and attrs' mypy plugin types a
field's argument from its converter only when that is a named function: so
each field has a small named converter that calls the shared check here
with the field's name.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs

__all__ = [
    "MAX_ID",
    "absolute_path",
    "boolean",
    "environment",
    "hint_unknown_keywords",
    "identifier",
    "seconds",
    "unknown_keyword",
]

_Class = TypeVar("_Class", bound=type)

# user_namespaces(7): ids are 32-bit and (uid_t)-1 is never valid.
MAX_ID = 2**32 - 2


def boolean(instance: object, attribute: attrs.Attribute[bool], value: object) -> None:
    """Validate a True/False field (1 and 0 are refused: they hide mistakes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be True or False, not {value!r}")


def identifier(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    """Validate a uid or gid: an int from 0 to MAX_ID."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, not {value!r}")
    if not 0 <= value <= MAX_ID:
        raise ValueError(f"{attribute.name} must be between 0 and {MAX_ID}, not {value}")


def seconds(*, zero_allowed: bool) -> Callable[[object, attrs.Attribute[float], object], None]:
    """Make a validator of a number of seconds: positive, or zero and up."""

    def check(instance: object, attribute: attrs.Attribute[float], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{attribute.name} must be a number of seconds, not {value!r}")
        if math.isnan(value) or value < 0 or (value == 0 and not zero_allowed):
            least = "zero or more" if zero_allowed else "more than zero"
            raise ValueError(f"{attribute.name} must be {least} seconds, not {value!r}")

    return check


def absolute_path(what: str, value: str | os.PathLike[str]) -> str:
    """Return `value` as an absolute path in the container (a str, no '..'), naming `what`.

    Raises:
        TypeError: for a value that is not a str path.
        ValueError: for a relative path, or one holding '..' or a NUL byte.
    """
    try:
        text = os.fspath(value)
    except TypeError:
        raise TypeError(f"{what} must be a path (str), not {value!r}") from None
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str path, not {value!r}")
    if not text.startswith("/"):
        raise ValueError(
            f"{what} {text!r} must be an absolute path inside the container, not a relative one"
        )
    if ".." in text.split("/") or "\0" in text:
        raise ValueError(f"{what} {text!r} contains '..' or a NUL byte")
    return text


def environment(
    what: str, value: Mapping[str, str] | Iterable[tuple[str, str]] | None
) -> tuple[tuple[str, str], ...] | None:
    """Return an environment (a mapping of str to str) as (name, value) pairs, naming `what`.

    Pairs keep a spec hashable and picklable; `dict(spec.env)` gives the
    mapping back.

    Raises:
        TypeError, ValueError: for what is not such a mapping.
    """
    if value is None:
        return None
    if isinstance(value, str | bytes):
        raise TypeError(f"{what} is a mapping of names to values, not {value!r}")
    try:
        pairs = tuple(dict(value).items())
    except (TypeError, ValueError):
        raise TypeError(f"{what} is a mapping of names to values, not {value!r}") from None
    for key, text in pairs:
        if not isinstance(key, str) or not isinstance(text, str):
            raise TypeError(f"{what} maps str to str, not {key!r} to {text!r}")
        if not key or "=" in key or "\0" in key or "\0" in text:
            raise ValueError(f"{what} variable name {key!r} or its value is not valid")
    return pairs


def unknown_keyword(
    what: str, name: str, known: Iterable[str], aliases: Mapping[str, str] | None = None
) -> TypeError:
    """Return the TypeError for an unknown keyword `name`, naming the closest known one.

    `aliases` maps a name that is another class's spelling (a container's
    `mounts` where a service says `mappings`) to this class's.
    """
    close = (aliases or {}).get(name) or next(
        iter(difflib.get_close_matches(name, list(known), n=1)), None
    )
    hint = f"; did you mean {close!r}?" if close else ""
    return TypeError(f"unknown {what} option {name!r}{hint}")


def hint_unknown_keywords(
    what: str, aliases: Mapping[str, str] | None = None
) -> Callable[[_Class], _Class]:
    """Make an attrs class's constructor name the closest option to a misspelt keyword.

    attrs' generated `__init__` raises Python's bare "unexpected keyword
    argument"; the wrapper keeps its signature (`__wrapped__`) for
    `inspect.signature` and the documentation.
    """

    def decorate(cls: _Class) -> _Class:
        generated: Callable[..., None] = cls.__dict__["__init__"]
        known = [field.alias for field in attrs.fields(cls)]

        @functools.wraps(generated)
        def __init__(self: object, *args: Any, **options: Any) -> None:
            unknown = sorted(set(options) - set(known))
            if unknown:
                raise unknown_keyword(what, unknown[0], known, aliases)
            generated(self, *args, **options)

        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    return decorate
