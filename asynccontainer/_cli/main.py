"""The `asynccontainer` command: run, exec, services, check.

In the spirit of `guix shell --container` and `unshare`. Every error a user
can cause is one line on stderr and exit status 2 (usage) or 1 (a failure
of what was asked); never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import anyio

from .._core.container import run_container
from .._core.excursion import container_excursion
from .._errors import ContainerError
from .._spec.container import ContainerSpec
from .._spec.filesystems import (
    CONTAINER_FILE_SYSTEMS,
    HOST_SYSTEM_MAPPINGS,
    NETWORK_FILE_MAPPINGS,
    WRITABLE_TMP,
    FileSystem,
    FileSystemMapping,
    MountItem,
)
from .._spec.namespaces import NAMESPACES
from .terminal import PseudoTerminal

__all__ = ["main"]

PROGRAM = "asynccontainer"
# timeout(1)'s status for a command it had to stop.
EXIT_TIMEOUT = 124
EXIT_USAGE = 2
EXIT_FAILURE = 1
# env(1)'s statuses for a command that cannot be found or executed.
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126
# Container.stop's: what a command gets between SIGTERM and SIGKILL.
_GRACE = 5.0

# What a human expects to find in a shell: the library itself starts from an
# empty environment, as Guix does.
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What an option left out means: the spec's own default.
_DEFAULTS = ContainerSpec()


class _Usage(Exception):
    """A bad argument: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _mapping(writable: bool) -> Callable[[str], FileSystemMapping]:
    """Parse SRC[=DST] as guix shell's --expose and --share do."""

    def parse(text: str) -> FileSystemMapping:
        source, _, target = text.partition("=")
        source = os.path.abspath(os.path.expanduser(source))
        if not os.path.exists(source):
            raise argparse.ArgumentTypeError(f"{source}: no such file or directory")
        try:
            return FileSystemMapping(source, target or None, writable=writable)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _readable_file(text: str) -> str:
    """Check a file argument as --expose checks its path: a bad one is a usage error."""
    if not os.path.isfile(text):
        what = "not a file" if os.path.exists(text) else "no such file or directory"
        raise argparse.ArgumentTypeError(f"{text}: {what}")
    return text


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above zero")
    return value


def _limit(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, as in memory=100M")
    return key, value


def _integer(what: str, minimum: int, maximum: int) -> Callable[[str], int]:
    """Make a parser of whole numbers from `minimum` to `maximum`, named `what` in errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {what} (from {minimum} to {maximum})"
            )
        return value

    return parse


# uid_t's largest, less (uid_t)-1, which means "no id" (setresuid(2)).
_id = _integer("a numeric id", 0, 2**32 - 2)
# PID_MAX_LIMIT (include/linux/threads.h): 4M on 64-bit machines.
_pid = _integer("a PID", 1, 1 << 22)


def build_parser(command_nargs: str = argparse.REMAINDER) -> argparse.ArgumentParser:
    """Return the argument parser of the `asynccontainer` command.

    `command_nargs` is how `run` and `exec` take their command: all that
    follows its first word (REMAINDER), or only words ("*", for the part
    before `--`, the command being what comes after).
    """
    parser = _Parser(
        prog=PROGRAM,
        description="Run Linux containers and containerised services (asynccontainer).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    # An option of each command, so that it may follow the command's name.
    common = _Parser(add_help=False)
    common.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the event loop to run on (default: asyncio)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser(
        "run",
        parents=[common],
        help="run a command in a new container",
        description="Run COMMAND in a new container: every namespace new, a fresh tmpfs "
        "root with the host's programs mapped read-only. Exits with its status.",
    )
    run.add_argument(
        "--share-net",
        action="store_true",
        help="keep the host's network (and map its resolver files)",
    )
    run.add_argument(
        "--expose",
        metavar="SRC[=DST]",
        type=_mapping(False),
        action="append",
        default=[],
        help="map a host path read-only (at DST, default SRC)",
    )
    run.add_argument(
        "--share",
        metavar="SRC[=DST]",
        type=_mapping(True),
        action="append",
        default=[],
        help="map a host path writable",
    )
    run.add_argument("--root", metavar="DIR", help="use this directory as the root")
    run.add_argument("--writable-root", action="store_true", help="leave the root writable")
    run.add_argument("--hostname", metavar="H", help="the host name inside")
    run.add_argument(
        "--uid", type=_id, dest="guest_uid", help=f"the uid inside (default {_DEFAULTS.guest_uid})"
    )
    run.add_argument(
        "--gid", type=_id, dest="guest_gid", help=f"the gid inside (default {_DEFAULTS.guest_gid})"
    )
    run.add_argument(
        "--env",
        metavar="K=V",
        type=_env_pair,
        action="append",
        default=[],
        help="set a variable (PATH, TERM and HOME are set unless given)",
    )
    run.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        help=f"stop the container after this long (exit status {EXIT_TIMEOUT})",
    )
    run.add_argument("--cwd", metavar="DIR", help="the working directory inside (default /)")
    run.add_argument(
        "--limit",
        metavar="KEY=VALUE",
        type=_limit,
        action="append",
        default=[],
        help="a cgroup limit: memory=100M, pids=64, cpu=0.5, cpu_weight=50",
    )
    run.add_argument(
        "--network",
        choices=("veth",),
        help="veth: a veth pair to the host, addresses of its own (root only)",
    )
    run.add_argument(
        "--tmpfs",
        metavar="PATH",
        action="append",
        default=[],
        help="a fresh writable tmpfs at PATH",
    )
    run.add_argument(
        "-t",
        "--tty",
        action="store_true",
        help="give the command a terminal (the default only when stdin, stdout and "
        "stderr all are terminals)",
    )
    run.add_argument(
        "--grace",
        metavar="SECONDS",
        type=_seconds,
        default=_GRACE,
        help="after SIGTERM (or --timeout), how long the command has to exit before "
        f"it is killed (default {_GRACE:g})",
    )
    run.add_argument("argv", nargs=command_nargs, metavar="-- COMMAND ARGS...")

    exec_ = commands.add_parser(
        "exec",
        parents=[common],
        help="run a command in the namespaces of a running process",
        description="Run COMMAND inside the namespaces of process PID (an excursion).",
    )
    exec_.add_argument("pid", type=_pid, metavar="PID")
    exec_.add_argument("--env", metavar="K=V", type=_env_pair, action="append", default=[])
    exec_.add_argument("argv", nargs=command_nargs, metavar="-- COMMAND ARGS...")

    services = commands.add_parser(
        "services",
        parents=[common],
        help="run the services a TOML file describes",
        description="Start every service FILE describes, show their status while they run, "
        "and stop them all on Ctrl-C or SIGTERM.",
    )
    services.add_argument("file", metavar="FILE.toml", type=_readable_file)
    services.add_argument(
        "--check", action="store_true", help="only check the file; report every error"
    )

    commands.add_parser(
        "check",
        parents=[common],
        help="say what this kernel supports",
        description="Check each namespace, unprivileged user namespaces, setgroups, the "
        "cgroup version and pidfd, and say what to change for what is missing.",
    )
    return parser


def _command_argv(argv: list[str]) -> list[str]:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise _Usage("no command given: write it after '--', as in: -- sh -c 'echo hi'")
    return argv


def _environment(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    env = {
        "PATH": _DEFAULT_PATH,
        "TERM": os.environ.get("TERM", "dumb"),
        "HOME": "/",
    }
    env.update(pairs)
    return env


def _status(returncode: int) -> int:
    """Turn a returncode into an exit status: 128+N for signal N, as shells do."""
    return 128 - returncode if returncode < 0 else returncode


def _limit_value(text: str) -> object:
    """Return a number where the limit is one (pids=64, cpu=0.5); a size stays text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _run_spec(arguments: argparse.Namespace, terminal: bool) -> ContainerSpec:
    """Return the ContainerSpec that `run`'s options describe.

    Options left out keep the spec's defaults, which are written only there.

    Raises:
        TypeError, ValueError: as ContainerSpec raises, for a bad option.
    """
    namespaces = [ns for ns in NAMESPACES if not (arguments.share_net and ns == "net")]
    mounts: list[MountItem] = []
    if arguments.root is None:
        mounts += [*HOST_SYSTEM_MAPPINGS, WRITABLE_TMP, *CONTAINER_FILE_SYSTEMS]
        if arguments.share_net:
            mounts += [m for m in NETWORK_FILE_MAPPINGS if os.path.exists(m.source)]
    mounts += arguments.expose + arguments.share
    mounts += [
        FileSystem("none", os.path.normpath(path), "tmpfs", flags={"no-suid", "no-dev"})
        for path in arguments.tmpfs
    ]
    limits: dict[str, object] | None = None
    if arguments.limit:
        limits = {key: _limit_value(value) for key, value in arguments.limit}
    options: dict[str, Any] = {
        "mounts": mounts,
        "namespaces": namespaces,
        "root": arguments.root and os.path.abspath(arguments.root),
        "writable_root": arguments.writable_root,
        "hostname": arguments.hostname,
        "env": _environment(arguments.env),
        "guest_uid": arguments.guest_uid,
        "guest_gid": arguments.guest_gid,
        "cwd": arguments.cwd,
        "limits": limits,
        "network": arguments.network,
        # An init relays signals to the command, which then behaves as it
        # would outside a pid namespace.
        "child_is_pid1": False,
        "new_session": True if terminal else None,
    }
    return ContainerSpec(**{k: v for k, v in options.items() if v is not None})


def _wants_terminal(asked: bool) -> bool:
    """Say whether to give a pty: when asked (-t), or when all three stdio are terminals.

    As `docker run -t` and ssh: `run ... | od -c` gets the command's bytes as
    they are, and its stderr stays apart from its stdout.

    Raises:
        _Usage: -t without a terminal on stdin to relay.
    """
    if asked and not os.isatty(0):
        raise _Usage("--tty needs a terminal on stdin to relay")
    return asked or all(os.isatty(fd) for fd in (0, 1, 2))


class _Supervisor:
    """What stops the command: a signal to this program, or --timeout; both politely.

    Before the container exists, a signal cancels its start. Once it runs,
    SIGTERM (and SIGINT without a terminal: with one, Ctrl-C is the
    container's) goes on to it, and SIGKILL follows after the grace period,
    as `Container.stop` does.
    """

    def __init__(self, grace: float, timeout: float | None) -> None:
        self.grace = grace
        self.timeout = timeout
        self.received: list[int] = []
        self.timed_out = False
        self.container: Any = None
        self.start_scope = anyio.CancelScope()

    async def watch_signals(self, with_terminal: bool) -> None:
        signals = (signal.SIGTERM,) if with_terminal else (signal.SIGINT, signal.SIGTERM)
        with anyio.open_signal_receiver(*signals) as receiver:
            async for signum in receiver:
                self.received.append(signum)
                if self.container is None:
                    self.start_scope.cancel()
                    return
                await self.container.stop(self.grace)
                return

    async def watch_time(self) -> None:
        if self.timeout is None:
            return
        await anyio.sleep(self.timeout)
        self.timed_out = True
        if self.container is not None:
            await self.container.stop(self.grace)
        else:
            self.start_scope.cancel()


async def _run(arguments: argparse.Namespace) -> int:
    argv = _command_argv(arguments.argv)
    with_terminal = _wants_terminal(arguments.tty)
    # A terminal delivers Ctrl-C to every process of its foreground group,
    # the container's included: the container decides (an interactive shell
    # lives on). Without a terminal, SIGINT is for this command to stop it.
    spec = _run_spec(arguments, terminal=with_terminal)
    terminal = PseudoTerminal() if with_terminal else None
    stdio: dict[str, Any] = (
        {"stdin": terminal.slave, "stdout": terminal.slave, "stderr": terminal.slave}
        if terminal is not None
        else {}
    )
    supervisor = _Supervisor(arguments.grace, arguments.timeout)
    returncode: int | None = None
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(supervisor.watch_signals, terminal is not None)
            group.start_soon(supervisor.watch_time)
            try:
                with supervisor.start_scope:
                    returncode = await _run_container(argv, spec, stdio, terminal, supervisor)
            except Exception as exc:
                # Raised again below, outside the task group, which would
                # wrap it in an exception group.
                failure = exc
            group.cancel_scope.cancel()
    finally:
        if terminal is not None:
            terminal.close()
    if failure is not None:
        raise failure
    if supervisor.timed_out:
        print(
            f"{PROGRAM}: the command ran longer than {arguments.timeout} s; it was stopped",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    if supervisor.received:
        return 128 + supervisor.received[0]
    assert returncode is not None
    return _status(returncode)


async def _run_container(
    argv: list[str],
    spec: ContainerSpec,
    stdio: dict[str, Any],
    terminal: PseudoTerminal | None,
    supervisor: _Supervisor,
) -> int:
    container = await run_container(argv, spec, **stdio)
    async with container:
        supervisor.container = container
        if terminal is None:
            return await container.wait()
        terminal.close_slave()
        with terminal.raw_mode():
            async with anyio.create_task_group() as group:
                group.start_soon(terminal.relay)
                returncode = await container.wait()
                # The relay ends when the last process closes the pty; an
                # orphan holding it open must not keep the command alive.
                with anyio.move_on_after(1):
                    await terminal.drained.wait()
                group.cancel_scope.cancel()
        return returncode


async def _exec(arguments: argparse.Namespace) -> int:
    argv = _command_argv(arguments.argv)
    returncode = await container_excursion(arguments.pid, argv, env=_environment(arguments.env))
    return _status(returncode)


async def _services(arguments: argparse.Namespace) -> int:
    from .._services.file import load_services, run_services

    # Services without a log file send their lines to the logging module:
    # show them on stderr, the status table having stdout.
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    specs, errors = load_services(arguments.file)
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        return EXIT_FAILURE
    if arguments.check:
        print(f"{arguments.file}: {len(specs)} service(s), no errors")
        return 0
    return await run_services(specs)


def _check() -> int:
    from .check import report

    return report(sys.stdout)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse the options; everything after the first `--` is the command, as it is.

    argparse's REMAINDER alone would swallow the options that follow a
    positional (`exec PID --env K=V -- COMMAND` took `--env` as the
    command): the options are parsed up to `--`, the command is the rest.
    """
    if "--" not in argv:
        return build_parser().parse_args(argv)
    split = argv.index("--")
    arguments = build_parser(command_nargs="*").parse_args(argv[:split])
    if getattr(arguments, "argv", None):
        raise _Usage(
            f"{arguments.argv[0]!r} before '--': write the command after it, and the options before"
        )
    if hasattr(arguments, "argv"):
        arguments.argv = argv[split + 1 :]
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `asynccontainer` command with `argv` (sys.argv[1:] by default).

    Returns:
        The exit status: the command's (128+N for a signal), 124 after
        --timeout, 127 or 126 when the command cannot be found or executed,
        2 for bad arguments, 1 for any other failure.
    """
    arguments: argparse.Namespace | None = None
    try:
        arguments = _parse(list(sys.argv[1:] if argv is None else argv))
        if arguments.command == "check":
            return _check()
        handler: Callable[[argparse.Namespace], Any] = {
            "run": _run,
            "exec": _exec,
            "services": _services,
        }[arguments.command]
        if arguments.command in ("run", "exec"):
            _command_argv(arguments.argv)  # a usage error before any loop starts
        status: int = anyio.run(handler, arguments, backend=arguments.backend)
        return status
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception as exc:
        return _report_failure(exc, arguments)


def _report_failure(exc: Exception, arguments: argparse.Namespace | None) -> int:
    """Print one line for `exc` and return the exit status it calls for."""
    if isinstance(exc, _Usage):
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = getattr(arguments, "argv", None)
    if (
        isinstance(exc, OSError)
        and (isinstance(exc, FileNotFoundError | PermissionError) or exc.errno == errno.ENOEXEC)
        and command
        and exc.filename == _command_argv(command)[0]
    ):
        # As env(1) and shells report a command they cannot run.
        missing = isinstance(exc, FileNotFoundError)
        print(
            f"{PROGRAM}: {exc.filename}: {'command not found' if missing else exc.strerror}",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND if missing else EXIT_NOT_EXECUTABLE
    if isinstance(exc, OSError | ContainerError):
        print(f"{PROGRAM}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    if isinstance(exc, TypeError | ValueError | LookupError):
        print(f"{PROGRAM}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if os.environ.get("ASYNCCONTAINER_TRACEBACK"):
        raise exc
    print(
        f"{PROGRAM}: internal error: {type(exc).__name__}: {_one_line(exc)} "
        "(set ASYNCCONTAINER_TRACEBACK=1 to see where, and please report it)",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def entry_point() -> NoReturn:
    """Exit with the status of main() (the console script)."""
    sys.exit(main())
