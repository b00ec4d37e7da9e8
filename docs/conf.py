"""Sphinx configuration: furo, MyST Markdown, and the API reference from the docstrings.

Build it with `nox -s docs` (warnings are errors). Nothing here needs the
network: there is no intersphinx, so references to the standard library,
anyio and trio are plain text.
"""

from __future__ import annotations

import builtins
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any

import attrs
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asynccontainer  # noqa: E402

project = "asynccontainer"
author = "asynccontainer developers"
copyright = "the asynccontainer developers; GPL-3.0-or-later"
release = asynccontainer.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]
# The copy button leaves out the prompt of a console block, and its output.
copybutton_prompt_text = "$ "
copybutton_only_copy_prompt_lines = True

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: ::: fences for admonitions, anchors for headings down to ###, so that
# pages can link to design.md#known-limits-and-where-they-will-be-lifted.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# In docstrings `name` is a cross-reference when it names something
# documented here, and code otherwise (as trio's docs do).
default_role = "py:obj"
# Every reference to a class, function, method or attribute must resolve:
# one missing from the reference is a warning, and `nox -s docs` makes
# warnings errors. Plain `code` (the default role, which also names
# parameters) and what lives outside the project (there is no
# intersphinx: the build has no network) are exempt.
nitpicky = True
nitpick_ignore_regex = [
    ("py:obj", r".*"),
    ("py:class", r"(collections\.abc|typing|anyio|trio|subprocess|os|socket|ipaddress)\..*"),
    ("py:class", r"(T|Ts|_Class|Any|Self|NoReturn|IO|TypeAlias|Path)"),
    ("py:class", r"asynccontainer\._\w+(\.\w+)*\.(T|Ts|_Class)"),
    ("py:class", r"(int|str|bytes|float|bool|object|type|tuple|list|dict|set|frozenset|None)"),
    # The built-in exceptions (the standard library's reference is not linked).
    ("py:exc", "|".join(n for n, v in vars(builtins).items() if isinstance(v, type))),
    ("py:class", "|".join(n for n, v in vars(builtins).items() if isinstance(v, type))),
]
# Publish every exported name first, so that annotations name the public
# path (asynccontainer.Service), not the private module it lives in.
for _name in asynccontainer.__all__:
    getattr(asynccontainer, _name)

# The docstrings are Google style ("Args:", "Returns:", "Raises:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

autodoc_member_order = "bysource"
# Short signatures, as trio's; the types go with each parameter's description.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_type_aliases = {"Target": "asynccontainer.Target"}
add_module_names = False
python_use_unqualified_type_names = True

html_theme = "furo"
html_title = f"asynccontainer {release}"


def _attribute_docs() -> dict[str, list[str]]:
    """Map each public constant's name to the docstring written under it in its module.

    The public names are defined in private modules and imported by
    `asynccontainer/__init__.py`, where autodoc looks for the docstring of a
    module-level value (and, finding none, would show the docstring of the
    value's type, tuple's or dict's); this finds it where it was written.
    """
    docs: dict[str, list[str]] = {}
    for module in pkgutil.iter_modules(asynccontainer.__path__, "asynccontainer."):
        importlib.import_module(module.name)
        analyzer = ModuleAnalyzer.for_module(module.name)
        for (scope, name), lines in analyzer.find_attr_docs().items():
            if scope == "" and name in asynccontainer.__all__:
                docs.setdefault(name, list(lines))
    return docs


_ATTRIBUTE_DOCS: dict[str, list[str]] = {}

# Handles made by the library, never by the user: shown without a constructor.
_NO_CONSTRUCTOR = {"asynccontainer.Container", "asynccontainer.Service"}


def _constant_docstring(*event: Any) -> None:
    """Handle autodoc-process-docstring: (app, what, name, obj, options, lines)."""
    _app, what, name, _obj, _options, lines = event
    if what == "data" and name.startswith("asynccontainer."):
        lines[:] = _ATTRIBUTE_DOCS.get(name.removeprefix("asynccontainer."), [])


def _default_text(default: Any) -> str:
    if isinstance(default, attrs.Factory):
        factory = default.factory
        empty = {dict: "{}", list: "[]", tuple: "()", set: "set()", frozenset: "frozenset()"}
        return empty.get(factory) or f"{factory.__name__}()"
    return repr(default)


def attrs_signature(cls: type) -> str:
    """Return the constructor signature of an attrs class as its users write it.

    attrs generates `__init__`, whose defaults read `attr_dict['name'].default`
    in its source; this writes them as values, factories as calls.
    """
    parts: list[str] = []
    for field in attrs.fields(cls):
        if not field.init:
            continue
        if field.kw_only and "*" not in parts:
            parts.append("*")
        if field.default is attrs.NOTHING:
            parts.append(field.name)
        else:
            parts.append(f"{field.name}={_default_text(field.default)}")
    return "(" + ", ".join(parts) + ")"


def _signature(*event: Any) -> tuple[str, str | None] | None:
    """Handle autodoc-process-signature: (app, what, name, obj, options, signature, return)."""
    app, what, name, obj, *_ = event
    if what not in ("class", "exception"):
        return None
    if name in _NO_CONSTRUCTOR:
        return "", None
    if attrs.has(obj):
        # The annotations of an attrs class are those of its fields as stored
        # (a tuple), not of what it accepts (any sequence, a mapping ...): the
        # docstring says what to pass, so no types are added to it.
        _recorded_annotations(app).pop(name, None)
        return attrs_signature(obj), None
    return None


def _recorded_annotations(app: Sphinx) -> dict[str, Any]:
    """Return where autodoc keeps the type hints it will add to descriptions."""
    document = getattr(app.env, "current_document", None)
    annotations = getattr(document, "autodoc_annotations", None)
    if isinstance(annotations, dict):
        return annotations
    recorded: dict[str, Any] = app.env.temp_data.setdefault("annotations", {})
    return recorded


def setup(app: Sphinx) -> None:
    """Connect the two autodoc handlers above."""
    _ATTRIBUTE_DOCS.update(_attribute_docs())
    app.connect("autodoc-process-docstring", _constant_docstring)
    # After autodoc's own handler, which records the type hints.
    app.connect("autodoc-process-signature", _signature, priority=600)
