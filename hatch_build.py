"""Build the C executor (asynccontainer/_forkserver/cexecutor.c) at install time.

An optional compiled part: where no C compiler is found, or the compile
fails (an architecture the executor's system calls do not cover), the
package installs without it and every plan runs in the Python executor
(`asynccontainer check` says which is in use).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("asynccontainer", "_forkserver", "cexecutor.c")
LIBRARY = Path("asynccontainer", "_forkserver", "_cexecutor.so")
INIT_SOURCE = Path("asynccontainer", "_forkserver", "acinit.c")
INIT = Path("asynccontainer", "_forkserver", "_acinit")

# -z now: every symbol bound at load, so the child (which shares the
# server's memory) never enters the dynamic linker's lazy binding;
# no stack protector: the child reads no TLS canary of the server thread's.
FLAGS = ["-O2", "-fPIC", "-shared", "-fno-stack-protector", "-Wl,-z,now", "-Wall"]
# The init runs in a container's root, where no libc of the host's is: a
# static program with no libc at all (its own _start, raw system calls).
INIT_FLAGS = ["-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector"]
INIT_FLAGS += ["-fno-pie", "-no-pie", "-Wall"]


def compiler() -> str | None:
    """Return the C compiler to use: $CC, Python's own, or cc/gcc/clang on PATH."""
    candidates = [os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0]]
    candidates += ["cc", "gcc", "clang"]
    for name in candidates:
        if name and shutil.which(name):
            return name
    return None


def build(root: Path) -> bool:
    """Compile the library into the source tree; False (with a warning) if it cannot be."""
    cc = compiler()
    if cc is None:
        print(
            "asynccontainer: no C compiler found; the Python executor will be used", file=sys.stderr
        )
        return False
    for flags, output, source in ((FLAGS, LIBRARY, SOURCE), (INIT_FLAGS, INIT, INIT_SOURCE)):
        command = [cc, *flags, "-o", str(root / output), str(root / source)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(
                "asynccontainer: the C executor did not compile; the Python executor will be "
                f"used:\n{result.stderr}",
                file=sys.stderr,
            )
            (root / LIBRARY).unlink(missing_ok=True)
            return False
    return True


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """hatchling's build hook: compile, and ship the library in the wheel."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Compile before the files are collected; add the library to a wheel."""
        root = Path(self.root)
        if not build(root):
            return
        if version == "editable":
            return  # the source tree is on the path: the library is found there
        build_data["force_include"][str(root / LIBRARY)] = str(LIBRARY)
        build_data["force_include"][str(root / INIT)] = str(INIT)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
