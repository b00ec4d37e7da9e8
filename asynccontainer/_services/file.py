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

Every error is reported with the line it is on, all at once.
"""

from __future__ import annotations

import re
import sys
import tomllib
from typing import Any, TextIO

import anyio
import attrs

from .._spec.filesystems import FileSystemMapping
from .._spec.seccomp import DEFAULT_SECCOMP, SeccompPolicy
from .group import Service, ServiceGroup
from .spec import ServiceSpec

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
        header = lines.get((name, None), 1)

        def error(field: str | None, message: str, header: int = header, name: str = name) -> None:
            line = lines.get((name, field), header) if field else header
            where = f"services.{name}" + (f".{field}" if field else "")
            errors.append(f"{path}:{line}: {where}: {message}")

        if not isinstance(table, dict):
            error(None, "must be a table of ServiceSpec fields")
            continue
        fields: dict[str, Any] = {"name": name}
        bad = False
        for field, value in table.items():
            if field not in _FIELDS:
                error(field, f"unknown field; the fields are {', '.join(_FIELDS)}")
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
            continue
        try:
            specs.append(ServiceSpec(**fields))
        except (TypeError, ValueError) as exc:
            # Each field passed its own check: a rule between fields is broken,
            # and its message names them, the one to change first.
            message = str(exc)
            named = [f for f in table if re.search(rf"\b{re.escape(f)}\b", message)]
            error(min(named, key=message.index) if named else None, message)
    return specs, errors


_COLUMNS = ("NAME", "PID", "STATE", "RESTARTS", "UPTIME")


def _state(service: Service) -> str:
    if service.running:
        return "running"
    if service.disabled:
        return "disabled"
    if service.returncode is not None:
        return f"exited {service.returncode}"
    return "restarting" if service.spec.respawn else "stopped"


def _uptime(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _rows(services: list[Service], failed: dict[str, str]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        (
            s.name,
            str(s.pid) if s.running else "-",
            _state(s),
            str(s.restarts),
            _uptime(s.uptime) if s.running else "-",
        )
        for s in services
    ]
    rows += [(name, "-", "failed: " + reason, "0", "-") for name, reason in failed.items()]
    return rows


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [_COLUMNS, *rows]
    ]


async def run_services(specs: list[ServiceSpec], out: TextIO | None = None) -> int:
    """Start the services, show their status until they end or a signal comes, stop them.

    Returns:
        0 after a stop by SIGINT or SIGTERM or when every service exited 0;
        1 if a service failed to start or exited otherwise.
    """
    import signal

    out = out or sys.stdout
    tty = out.isatty()
    failed: dict[str, str] = {}
    services: list[Service] = []
    stopped_by_signal = False
    with anyio.CancelScope() as main:

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

                    async def start(spec: ServiceSpec) -> None:
                        try:
                            services.append(await group.start(spec))
                        except Exception as exc:
                            failed[spec.name] = (
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                            )

                    async with anyio.create_task_group() as starters:
                        for spec in specs:
                            starters.start_soon(start, spec)
                    services.sort(key=lambda s: [sp.name for sp in specs].index(s.name))
                    shown: list[str] = []
                    while any(s.returncode is None for s in services):
                        lines = _table(_rows(services, failed))
                        if tty:
                            if shown:
                                out.write(f"\x1b[{len(shown)}F\x1b[J")
                            out.write("\n".join(lines) + "\n")
                            out.flush()
                            shown = lines
                        elif [line.split()[:3] for line in lines] != [
                            line.split()[:3] for line in shown
                        ]:
                            out.write("\n".join(lines) + "\n\n")
                            out.flush()
                            shown = lines
                        await anyio.sleep(1)
            finally:
                watchers.cancel_scope.cancel()
    out.write("\n".join(_table(_rows(services, failed))) + "\n")
    out.flush()
    if stopped_by_signal:
        return 0
    if failed or any(s.returncode for s in services):
        return 1
    return 0
