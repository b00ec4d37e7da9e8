"""Developer tasks: `nox -s tests lint typecheck docs` is what CI runs."""

from __future__ import annotations

import shutil

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True
# A session whose interpreter is missing fails: nox's default is to skip it
# and exit 0, which would pass a machine that ran nothing.
nox.options.error_on_missing_interpreters = True

# The oldest supported version present here; none present fails (above).
# The suite has run on 3.11 only so far: 3.12 and 3.13 are taken where 3.11
# is missing, not yet run beside it.
SUPPORTED = ("3.11", "3.12", "3.13")
PYTHON = next((v for v in SUPPORTED if shutil.which(f"python{v}")), SUPPORTED[0])


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (as root: part of it re-runs as an unprivileged user)."""
    session.install("-e", ".[test]")
    # Both executors run the whole suite: the C one (built by the install,
    # hatch_build.py), then the Python one, which the C one falls back to.
    # A CI machine with a compiler must have built it: fail, not fall back.
    built = "from asynccontainer._plan.encode import LIBRARY; assert LIBRARY.exists(), LIBRARY"
    session.run("python", "-c", built)
    session.run("python", "-m", "pytest", *session.posargs)
    session.run(
        "python", "-m", "pytest", *session.posargs, env={"ASYNCCONTAINER_EXECUTOR": "python"}
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check style with ruff, the import contracts (pyproject.toml) and complexity."""
    session.install("-e", ".", "ruff>=0.6", "import-linter>=2.1", "xenon>=0.9")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # The layers point one way, and the fork server's side never imports anyio.
    session.run("lint-imports")
    # No function above radon's grade C (cyclomatic complexity 20).
    session.run("xenon", "--max-absolute", "C", "asynccontainer")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy --strict."""
    session.install("-e", ".", "mypy>=1.10", "trio>=0.26")
    session.run("mypy", "--strict", "asynccontainer")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the HTML documentation with Sphinx; every warning is an error."""
    session.install("-e", ".[docs]")
    session.run(
        "sphinx-build",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "docs",
        "docs/_build/html",
        *session.posargs,
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks beside bubblewrap, unshare and plain subprocesses; write plots."""
    import shutil

    missing = [
        p for p, tool in (("bubblewrap", "bwrap"), ("socat", "socat")) if not shutil.which(tool)
    ]
    if missing:
        # From the distribution's packages (Debian here): the baselines.
        session.run("apt-get", "install", "-y", "-qq", *missing, external=True)
    session.install("-e", ".", "matplotlib>=3.8", "trio>=0.26")
    session.run("python", "-m", "bench", *session.posargs)
