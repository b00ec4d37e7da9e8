"""Listening sockets a service is given: systemd's socket units, Shepherd 1.0's endpoints.

The caller binds and listens, so a low port needs no capability in the
service, and a service with a network namespace of its own still serves
on the host's. The service gets the sockets as fds 3, 4 ... with
LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (sd_listen_fds(3)).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from typing import Any

import attrs

__all__ = ["Endpoint", "bind_all", "close_all", "parse_endpoint"]

# sun_path holds 108 bytes, its NUL included (unix(7)).
_SUN_PATH = 108


def _address(value: Any) -> tuple[str, int] | str:
    if isinstance(value, str):
        if not value.startswith("/"):
            raise ValueError(
                f"an endpoint's address is (host, port) or an absolute Unix socket path, "
                f"not {value!r}"
            )
        if len(os.fsencode(value)) >= _SUN_PATH or "\0" in value:
            raise ValueError(f"a Unix socket path holds fewer than {_SUN_PATH} bytes: {value!r}")
        return value
    try:
        host, port = value
    except (TypeError, ValueError):
        raise TypeError(
            f"an endpoint's address is (host, port) or a Unix socket path, not {value!r}"
        ) from None
    if not isinstance(host, str):
        raise TypeError(f"an endpoint's host is a str such as '127.0.0.1' or '::1', not {host!r}")
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            # Never a name to resolve: what it names may change under the service.
            raise ValueError(
                f"an endpoint's host is a numeric address ('127.0.0.1', '::1', '' for all), "
                f"not {host!r}"
            ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"an endpoint's port is 1 to 65535, not {port!r}")
    return host, port


def _name(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= 255
        or ":" in value
        or not value.isascii()
        or not value.isprintable()
    ):
        raise ValueError(
            f"an endpoint's name is 1 to 255 printable ASCII characters but ':' "
            f"(LISTEN_FDNAMES separates names with it), not {value!r}"
        )


def _backlog(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
        raise ValueError(f"an endpoint's backlog is 1 to 65535 connections, not {value!r}")


@attrs.frozen
class Endpoint:
    """A socket the caller listens on for a service (a TCP address or a Unix socket path).

    Args:
        address: (host, port) for TCP, the host a numeric IPv4 or IPv6
            address or "" for every IPv4 address; or the absolute path of
            a Unix stream socket (a stale socket there is replaced; any
            other file is an error).
        name: its name in LISTEN_FDNAMES; the service's name by default.
        backlog: listen(2)'s backlog: how many connections wait to be
            accepted.

    Raises:
        TypeError, ValueError: naming what is wrong, when it is made.
    """

    address: tuple[str, int] | str = attrs.field(converter=_address)
    name: str | None = attrs.field(default=None, validator=_name)
    backlog: int = attrs.field(default=128, validator=_backlog)

    def __str__(self) -> str:
        if isinstance(self.address, str):
            return self.address
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"

    def listen(self) -> socket.socket:
        """Return a new socket bound to the address and listening, close-on-exec and blocking.

        Raises:
            OSError: the bind or listen failed (the address is in use, a
                low port without CAP_NET_BIND_SERVICE ...), naming the
                address; or a file that is not a socket is at the path.
        """
        if isinstance(self.address, str):
            family = socket.AF_UNIX
        else:
            family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                # Only the address given, whatever the system's default.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if family == socket.AF_UNIX:
                _remove_stale(str(self.address))
            else:
                # A port in TIME_WAIT from a service's last run is free to bind.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.address)
            sock.listen(self.backlog)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"cannot listen on {self}: {exc.strerror}", str(self)
            ) from None
        return sock


def _remove_stale(path: str) -> None:
    """Remove a socket left at `path` by an earlier run; refuse to replace anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(errno.EEXIST, "a file that is not a socket is there; remove it", path)
    os.unlink(path)


def bind_all(endpoints: tuple[Endpoint, ...]) -> list[socket.socket]:
    """Return a listening socket for each endpoint, in order; all or none.

    Raises:
        OSError: as `Endpoint.listen`, for the first that fails (the
            others are closed again).
    """
    sockets: list[socket.socket] = []
    try:
        for endpoint in endpoints:
            sockets.append(endpoint.listen())
    except BaseException:
        close_all(endpoints, sockets)
        raise
    return sockets


def close_all(endpoints: tuple[Endpoint, ...], sockets: list[socket.socket]) -> None:
    """Close the sockets, and remove the files of the Unix ones (systemd's RemoveOnStop=)."""
    for sock in sockets:
        sock.close()
    for endpoint in endpoints[: len(sockets)]:
        if isinstance(endpoint.address, str):
            try:
                if stat.S_ISSOCK(os.lstat(endpoint.address).st_mode):
                    os.unlink(endpoint.address)
            except OSError:
                pass  # gone already
    sockets.clear()


def parse_endpoint(value: Any) -> Endpoint:
    """Read an endpoint of a services file: "HOST:PORT", "[V6]:PORT", "/path", or a table.

    Raises:
        TypeError, ValueError: naming what is wrong.
    """
    if isinstance(value, dict):
        unknown = set(value) - {"address", "name", "backlog"}
        if unknown:
            raise ValueError(f"an endpoint has address, name and backlog, not {sorted(unknown)}")
        if "address" not in value:
            raise ValueError('an endpoint table needs an address, as address = "127.0.0.1:8080"')
        return Endpoint(
            _parse_address(value["address"]),
            value.get("name"),
            backlog=value.get("backlog", 128),
        )
    return Endpoint(_parse_address(value))


def _parse_address(value: Any) -> tuple[str, int] | str:
    if not isinstance(value, str):
        raise TypeError(f'an endpoint is "HOST:PORT", "[V6]:PORT" or "/path", not {value!r}')
    if value.startswith("/"):
        return value
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f'an endpoint is "HOST:PORT", "[V6]:PORT" or "/path", not {value!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
