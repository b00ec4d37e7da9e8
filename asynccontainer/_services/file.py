"""Services described in a TOML file, for `asynccontainer services`.

The file has one table per service, named after it; its keys are the
ServiceSpec fields::

    [services.web]
    command = ["python3", "-u", "-m", "http.server", "8000"]
    user = "nobody"
    log_file = "/var/log/web.log"
    resource_limits = { nofile = 1024 }

    [services.cache]
    command = ["memcached", "-u", "nobody"]
    mappings = ["/srv/cache=/var/cache:rw", "/etc/memcached.conf"]

    [services.echo]
    command = ["cat"]
    sockets = ["127.0.0.1:7000", {address = "/run/echo.sock", backlog = 16}]
    accept = true

Every error is reported with the line it is on, all at once.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import sys
import tomllib
from collections.abc import Iterator
from typing import Any, TextIO

import anyio
import attrs

from .._spec.filesystems import FileSystemMapping
from .._spec.seccomp import DEFAULT_SECCOMP, SeccompPolicy
from .endpoint import parse_endpoint
from .group import Service, ServiceGroup
from .order import check_order
from .spec import _CONTAINER_SPELLINGS, ServiceSpec

__all__ = ["load_services", "run_services"]

_FIELDS = tuple(field.name for field in attrs.fields(ServiceSpec))
_NAME = r'(?:"(?P<q>[^"]+)"|\'(?P<s>[^\']+)\'|(?P<b>[A-Za-z0-9_-]+))'
_HEADER = re.compile(
    rf"^\s*\[\s*services\s*\.\s*{_NAME}\s*(?:\.\s*(?P<field>[A-Za-z0-9_-]+)\s*)?\]"
)
_OTHER_HEADER = re.compile(r"^\s*\[")
_KEY = re.compile(r'^\s*(?:"(?P<q>[^"]+)"|(?P<b>[A-Za-z0-9_-]+))\s*=')


def _lines(text: str) -> dict[tuple[str, str | None], int]:
    """Map (service, field) and (service, None) to the line where each is given."""
    where: dict[tuple[str, str | None], int] = {}
    current: str | None = None
    in_subtable = False
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            current = header["q"] or header["s"] or header["b"]
            field = header["field"]
            in_subtable = field is not None
            where.setdefault((current, field), number)
            continue
        if _OTHER_HEADER.match(line):
            current = None
            continue
        key = _KEY.match(line)
        if key and current is not None and not in_subtable:
            where.setdefault((current, key["q"] or key["b"]), number)
    return where


def _mapping(item: Any) -> FileSystemMapping:
    """Read a mapping: "SRC[=DST][:rw]" or {source=, target=, writable=}."""
    if isinstance(item, str):
        writable = item.endswith(":rw")
        text = item.removesuffix(":rw").removesuffix(":ro")
        source, _, target = text.partition("=")
        return FileSystemMapping(source, target or None, writable=writable)
    if isinstance(item, dict):
        unknown = set(item) - {"source", "target", "writable"}
        if unknown:
            raise ValueError(f"a mapping has source, target and writable, not {sorted(unknown)}")
        return FileSystemMapping(
            item.get("source"),  # type: ignore[arg-type]
            item.get("target"),
            writable=item.get("writable", False),
        )
    raise TypeError(f'a mapping is "SRC[=DST][:rw]" or a table, not {item!r}')


# Options that only Python can give: a callable, and fds of the calling process.
_PYTHON_ONLY = {
    "populate": "a Python callable",
    "pass_fds": "fds of a Python program",
}


def _seccomp(value: Any) -> SeccompPolicy | None:
    """Read seccomp: true (the default filter), false (none), or a table of SeccompPolicy."""
    if value is True:
        return DEFAULT_SECCOMP
    if value is False:
        return None
    if isinstance(value, dict):
        unknown = set(value) - {field.name for field in attrs.fields(SeccompPolicy)}
        if unknown:
            raise ValueError(f"a seccomp table has deny, errno and the like, not {sorted(unknown)}")
        return SeccompPolicy(**value)
    raise TypeError(f"seccomp is true, false or a table like {{deny = ['mount']}}, not {value!r}")


def _convert(field: str, value: Any) -> Any:
    """Turn a TOML value into what the ServiceSpec field takes."""
    if field in _PYTHON_ONLY:
        raise TypeError(f"{field} is {_PYTHON_ONLY[field]}; it cannot be given in a services file")
    if field == "mappings":
        if not isinstance(value, list):
            raise TypeError(f"mappings is a list, not {value!r}")
        return [_mapping(item) for item in value]
    if field == "resource_limits" and isinstance(value, dict):
        return {key: tuple(v) if isinstance(v, list) else v for key, v in value.items()}
    if field == "seccomp":
        return _seccomp(value)
    if field == "sockets":
        if not isinstance(value, list):
            raise TypeError(
                f'sockets is a list, as ["127.0.0.1:8080", "/run/web.sock"], not {value!r}'
            )
        return [parse_endpoint(item) for item in value]
    return value


def _check_field(field: str, value: Any) -> None:
    """Run one field's own converter and validator, as the spec would.

    Rules between fields are checked when the whole spec is made.
    """
    attribute = attrs.fields_dict(ServiceSpec)[field]
    convert: Any = attribute.converter  # a plain function: every field's converter is one
    if convert is not None:
        value = convert(value)
    if attribute.validator is not None:
        attribute.validator(None, attribute, value)


def _read_service(
    path: str,
    lines: dict[tuple[str, str | None], int],
    name: str,
    table: Any,
    errors: list[str],
) -> ServiceSpec | None:
    """Return the spec of one [services.NAME] table, or None after adding its errors."""
    header = lines.get((name, None), 1)

    def error(field: str | None, message: str) -> None:
        line = lines.get((name, field), header) if field else header
        where = f"services.{name}" + (f".{field}" if field else "")
        errors.append(f"{path}:{line}: {where}: {message}")

    if not isinstance(table, dict):
        error(None, "must be a table of ServiceSpec fields")
        return None
    fields: dict[str, Any] = {"name": name}
    bad = False
    for field, value in table.items():
        if field not in _FIELDS:
            close = _CONTAINER_SPELLINGS.get(field) or next(
                iter(difflib.get_close_matches(field, _FIELDS, n=1)), None
            )
            hint = f"did you mean {close!r}? " if close else ""
            error(field, f"unknown field; {hint}the fields are {', '.join(_FIELDS)}")
            bad = True
            continue
        try:
            converted = _convert(field, value)
            _check_field(field, converted)
        except (TypeError, ValueError) as exc:
            error(field, str(exc))
            bad = True
            continue
        fields[field] = converted
    if "command" not in table:
        error(None, 'has no command: add command = ["program", "argument", ...]')
        bad = True
    if bad:
        return None
    try:
        return ServiceSpec(**fields)
    except (TypeError, ValueError) as exc:
        # Each field passed its own check: a rule between fields is broken,
        # and its message names them, the one to change first.
        message = str(exc)
        named = [f for f in table if re.search(rf"\b{re.escape(f)}\b", message)]
        error(min(named, key=message.index) if named else None, message)
        return None


def load_services(path: str) -> tuple[list[ServiceSpec], list[str]]:
    """Read the services of a TOML file.

    Returns:
        The specs, and the errors as "FILE:LINE: what is wrong" lines (the
        specs are only usable when there is no error).

    Raises:
        OSError: when the file cannot be read.
    """
    with open(path, "rb") as file:
        raw = file.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        line = found.group(1) if found else "1"
        return [], [f"{path}:{line}: {exc}"]

    lines = _lines(text)
    errors: list[str] = []
    specs: list[ServiceSpec] = []
    unknown_top = sorted(set(data) - {"services"})
    for key in unknown_top:
        errors.append(f"{path}:1: unknown top-level key {key!r}; services go in [services.NAME]")
    services = data.get("services")
    if not isinstance(services, dict) or not services:
        errors.append(f"{path}:1: no services: describe each in a [services.NAME] table")
        return [], errors

    for name, table in services.items():
        spec = _read_service(path, lines, name, table, errors)
        if spec is not None:
            specs.append(spec)
    if not errors:
        try:
            check_order(specs, ())
        except ValueError as exc:
            errors.append(f"{path}:1: {exc}")
    return specs, errors


# PID is the main process's (its PID file's, MAINPID='s, or the command's);
# STATUS the last STATUS= of a service with notify=True.
_COLUMNS = ("NAME", "PID", "STATE", "RESTARTS", "UPTIME", "STATUS")


def _state(service: Service) -> str:
    if service.disabled:
        return "disabled"
    if service.returncode is not None:
        return f"exited {service.returncode}"
    return service.state


def _uptime(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _rows(
    specs: list[ServiceSpec], services: dict[str, Service], failed: dict[str, str]
) -> list[tuple[str, ...]]:
    """One row per service, in the file's order; a failed one says "failed" (why: `_reasons`)."""
    rows: list[tuple[str, ...]] = []
    for spec in specs:
        service = services.get(spec.name)
        if service is None:
            state = "failed" if spec.name in failed else "starting"
            rows.append((spec.name, "-", state, "0", "-", ""))
            continue
        rows.append(
            (
                service.name,
                str(service.pid) if service.running else "-",
                _state(service),
                str(service.restarts),
                _uptime(service.uptime) if service.running else "-",
                service.status_text,
            )
        )
    return rows


def _reasons(specs: list[ServiceSpec], failed: dict[str, str]) -> list[str]:
    """Return the failures' reasons, for under the table: too long for a column."""
    return [f"{spec.name}: {failed[spec.name]}" for spec in specs if spec.name in failed]


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [_COLUMNS, *rows]
    ]


class _Screen:
    """The status table on `out`: redrawn in place on a terminal, with log lines above it.

    A log line written while the table is on the terminal would land in it
    and the next redraw would erase it: the handler of `logging_above`
    erases the table, writes the line, and draws the table again below it.
    Without a terminal, a table is printed whenever a state changes.
    """

    def __init__(self, out: TextIO, specs: list[ServiceSpec]) -> None:
        self.out = out
        self.specs = specs
        self.tty = out.isatty()
        self.shown: list[str] = []

    def _lines(self, services: dict[str, Service], failed: dict[str, str]) -> list[str]:
        return _table(_rows(self.specs, services, failed)) + _reasons(self.specs, failed)

    def _erase(self) -> None:
        if self.tty and self.shown:
            self.out.write(f"\x1b[{len(self.shown)}F\x1b[J")

    def show(
        self, services: dict[str, Service], failed: dict[str, str], final: bool = False
    ) -> None:
        lines = self._lines(services, failed)
        if self.tty:
            self._erase()
        elif not final and [line.split()[:3] for line in lines] == [
            line.split()[:3] for line in self.shown
        ]:
            return
        self.out.write("\n".join(lines) + ("\n" if self.tty or final else "\n\n"))
        self.out.flush()
        self.shown = lines

    def write_above(self, text: str) -> None:
        """Write a log line above the table (on a terminal), or as it is."""
        self._erase()
        self.out.write(text + "\n")
        if self.tty and self.shown:
            self.out.write("\n".join(self.shown) + "\n")
        self.out.flush()

    @contextlib.contextmanager
    def logging_above(self) -> Iterator[None]:
        """Send the services' log lines (logger asynccontainer.service) above the table."""
        if not self.tty:
            yield
            return
        screen = self

        class Above(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                screen.write_above(self.format(record))

        handler = Above()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger = logging.getLogger("asynccontainer.service")
        logger.addHandler(handler)
        propagate, logger.propagate = logger.propagate, False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate


async def run_services(specs: list[ServiceSpec], out: TextIO | None = None) -> int:
    """Start the services, show their status until they end or a signal comes, stop them.

    Returns:
        0 after a stop by SIGINT or SIGTERM or when every service exited 0;
        1 if a service failed to start or exited otherwise.
    """
    import signal

    out = out or sys.stdout
    screen = _Screen(out, specs)
    failed: dict[str, str] = {}
    services: dict[str, Service] = {}
    stopped_by_signal = False
    with anyio.CancelScope() as main, screen.logging_above():

        async def on_signal() -> None:
            nonlocal stopped_by_signal
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
                async for _ in receiver:
                    stopped_by_signal = True
                    main.cancel()
                    return

        async with anyio.create_task_group() as watchers:
            watchers.start_soon(on_signal)
            try:
                async with ServiceGroup() as group:
                    # In dependency order (load_services checked it has no
                    # cycle); unlike start_all, what can start stays up.
                    started, errors, skipped = await group._start_in_order(specs)
                    services.update(started)
                    for name, exc in errors.items():
                        failed[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    for name, required in skipped.items():
                        failed[name] = f"requires {required!r}, which failed to start"
                    while any(s.returncode is None for s in services.values()):
                        screen.show(services, failed)
                        await anyio.sleep(1)
            finally:
                watchers.cancel_scope.cancel()
    screen.show(services, failed, final=True)
    if stopped_by_signal:
        return 0
    if failed or any(s.returncode for s in services.values()):
        return 1
    return 0
