"""The documentation's programs run as written, and print what the pages say they print.

Every ```python block of the front page, the tutorial and the how-to guides is a whole
program (fragments are written as ```{code-block} python and are not run).
Each runs in a subprocess of its own, as a reader would run it, with a
time limit; the ```text block that follows it, if any, is its output, and
each of its lines must be among the lines the program printed (numbers,
spaces and file names aside: PIDs, times and paths differ from run to run).

The rootless guide's programs run as an unprivileged user (uid 65534)
when the suite runs as root, inside a container that maps this
interpreter, as tests/test_unprivileged.py does.

The Sphinx build itself (with warnings as errors) is `nox -s docs`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

import asynccontainer as ac

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = [
    "index.md",
    "tutorial.md",
    *sorted(
        f"howto/{page.name}" for page in (DOCS / "howto").glob("*.md") if page.name != "index.md"
    ),
]
UNPRIVILEGED_PAGES = {"howto/rootless.md"}
NOBODY = 65534
# Each program takes well under 5 s; the margin is for a loaded machine.
PROGRAM_TIMEOUT = 60

FENCE = re.compile(r"^```(\S*)")


class Program(NamedTuple):
    page: str
    line: int
    code: str
    output: str | None


def programs(page: str) -> list[Program]:
    """Return the ```python blocks of a page, each with the ```text block right after it."""
    lines = (DOCS / page).read_text().splitlines()
    blocks: list[tuple[str, int, str]] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        start = index + 1
        index = start
        while index < len(lines) and lines[index].rstrip() != "```":
            index += 1
        blocks.append((opening.group(1), start, "\n".join(lines[start:index]) + "\n"))
        index += 1
    found = []
    for number, (language, start, code) in enumerate(blocks):
        if language != "python":
            continue
        output = None
        if number + 1 < len(blocks) and blocks[number + 1][0] == "text":
            closing = start + code.count("\n")
            next_opening = blocks[number + 1][1] - 1
            if not any(line.strip() for line in lines[closing + 1 : next_opening]):
                output = blocks[number + 1][2]
        found.append(Program(page, start, code, output))
    return found


PROGRAMS = [program for page in PAGES for program in programs(page)]


def normalise(line: str) -> str:
    line = re.sub(r'File "[^"]*"', 'File "..."', line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return " ".join(line.split())


# Runs as root: starts `argv` as uid 65534 in a container (no user namespace)
# where this interpreter and the program's directory are mapped at their own
# paths; their parents are made world-readable there, whatever they are on
# the host.
AS_NOBODY = """
import json, os, sys
import anyio
import asynccontainer as ac

paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
paths.update(os.path.realpath(p) for p in sys.path if p and os.path.isdir(p))
paths.add(os.getcwd())
kept = [p for p in sorted(paths) if not any(p.startswith(q + "/") for q in paths if q != p)]
mappings = [ac.FileSystemMapping(p) for p in kept if not p.startswith(("/usr/", "/lib"))]
argv = json.loads(sys.argv[1])


async def main():
    return await ac.call_with_container(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *argv],
        namespaces=["mnt", "pid", "ipc", "uts", "net"],
        # A proc and a sysfs without masks, so that the user namespaces
        # of the program's containers may mount their own (see capture.py).
        mounts=[
            *ac.HOST_SYSTEM_MAPPINGS,
            ac.WRITABLE_TMP,
            *mappings,
            ac.FileSystem("proc", "/run/unmasked/proc", "proc"),
            ac.FileSystem("sysfs", "/run/unmasked/sys", "sysfs", flags={"read-only"}),
        ],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp"},
        cwd=os.getcwd(),
        seccomp=ac.SeccompPolicy(deny_setuid_files=False),
    )


sys.exit(anyio.run(main))
"""


def command_for(program: Program, path: Path) -> list[str]:
    argv = [sys.executable, str(path)]
    if program.page in UNPRIVILEGED_PAGES and os.geteuid() == 0:
        # The directory pytest made is private to root: open it to the user.
        path.parent.chmod(0o755)
        path.chmod(0o644)
        return [sys.executable, "-c", AS_NOBODY, json.dumps(argv)]
    return argv


@pytest.mark.timeout(PROGRAM_TIMEOUT * 2)
@pytest.mark.parametrize(
    "program", PROGRAMS, ids=[f"{program.page}:{program.line}" for program in PROGRAMS]
)
def test_program_runs_as_written(program: Program, tmp_path: Path) -> None:
    path = tmp_path / "program.py"
    path.write_text(program.code)
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        command_for(program, path),
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT,
        check=False,
    )
    report = f"{program.page}:{program.line}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    if program.output is not None:
        printed = {normalise(line) for line in (result.stdout + result.stderr).splitlines()}
        missing = [
            line
            for line in program.output.splitlines()
            if line.strip() and normalise(line) not in printed
        ]
        assert not missing, f"the page shows lines the program did not print: {missing}\n{report}"


def test_every_page_has_programs() -> None:
    for page in PAGES:
        assert programs(page), f"{page} has no ```python program"


def test_api_reference_documents_every_public_name() -> None:
    text = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^\.\. auto\w+:: (?:asynccontainer\.)?(\w+)", text, re.MULTILINE))
    assert documented == set(ac.__all__), (
        f"missing from docs/api.md: {sorted(set(ac.__all__) - documented)}; "
        f"documented but not public: {sorted(documented - set(ac.__all__))}"
    )


@pytest.mark.parametrize("name", ["Container", "Service"])
def test_api_reference_lists_every_public_member_of_the_handles(name: str) -> None:
    text = (DOCS / "api.md").read_text()
    members = re.search(rf"autoclass:: {name}\(\)\n   :members: (.*)\n", text)
    assert members is not None
    listed = {member.strip() for member in members.group(1).split(",")}
    kind = getattr(ac, name)
    public = {m for m in dir(kind) if not m.startswith("_")} | set(kind.__annotations__)
    assert public == listed, f"missing: {public - listed}; not members: {listed - public}"
