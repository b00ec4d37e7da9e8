"""Messages between the caller, the fork server and the container, and their framing.

Three channels, all AF_UNIX sockets (see docs/design.md):

- the *control* socket (SOCK_SEQPACKET), caller to server only: one
  `SpawnRequest` per datagram, with the two sockets below attached as
  SCM_RIGHTS. A datagram is delivered whole or not at all, so any number of
  tasks, threads or event loops may send on it without a lock, and the
  server never answers on it: nothing on this socket needs routing back.
- the *status* socket (stream), server to caller: `Forked` (with a pidfd)
  or `SpawnFailed`, and at the end `Exited`.
- the *handshake* socket (stream), caller and container: the caller sends
  `ContainerSetup` (the plan, with the container's stdio fds) or
  `ExcursionSetup`; a container answers `Ready` or `Execing`, or
  `StepFailed` naming the step of its plan that failed; an excursion
  answers `Ready`, `Execing` or `SetupFailed`, and one for a value then
  `Returned` or `Raised`. It is close-on-exec in the container, so
  end-of-file after `Execing` means the exec succeeded (the same trick as
  subprocess's error pipe).

Stream frames are a 4-byte big-endian length, a 1-byte count of the fds that
travel with the frame, then a pickle. What the caller sends the server or a
container comes from the same user's process. What a container sends back
is read by the caller, and a hostile container can forge it: an OSError of
a step is rebuilt from its errno alone, but other exceptions and excursion
values are still unpickled (docs/security.md, "Excursions enter the
container").
"""

from __future__ import annotations

import array
import io
import os
import pickle
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from ._errors import ContainerError, UntrustedValueError
from ._kernel import SCM_MAX_FD

if TYPE_CHECKING:
    # Only named here: the fork server imports this module, and the
    # messages are tuples rather than attrs classes, so that its start
    # imports neither attrs nor these modules (issue 13, a first container
    # within 40 ms); a message that holds one imports it when unpickled.
    from ._spec.limits import CgroupLimits, ResourceUsage
    from ._spec.network import VethNetwork

__all__ = [
    "MAX_FDS",
    "ContainerSetup",
    "Emptied",
    "ExceptionInfo",
    "Execing",
    "Exited",
    "Forked",
    "FrameBuffer",
    "IdMap",
    "KillRequest",
    "Raised",
    "Ready",
    "Returned",
    "SetupFailed",
    "SpawnFailed",
    "SpawnRequest",
    "StepFailed",
    "decode_reply",
    "decode_value",
    "encode_frame",
    "plain",
    "recv_frame",
    "send_frame",
]

MAX_FDS = SCM_MAX_FD
"""The most fds one message carries (the kernel's SCM_MAX_FD)."""

_HEADER = struct.Struct(">IB")
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class IdMap(NamedTuple):
    """The uid/gid maps of a new user namespace (see `write_id_maps`)."""

    guest_uid: int
    guest_gid: int
    # How many ids are mapped ("count" is a tuple's method).
    size: int


class SpawnRequest(NamedTuple):
    """Caller to server: clone a container with these flags (fds: handshake, status)."""

    clone_flags: int
    id_map: IdMap | None
    # cgroups to create and move the child into before its go.
    limits: CgroupLimits | None = None
    # "veth": a veth pair to the host, made before its go.
    network: str | None = None
    # An excursion: the host PID of the container it enters, whose cgroups
    # (if the server made some) it joins before its go, as docker exec does.
    cgroup_of: int | None = None
    # Which executor runs the plan: "python" (a zygote, the plan pickled) or
    # "c" (a CLONE_VM child of the server, the plan of `_plan.encode`).
    executor: str = "python"


# How deep a value from inside may nest; deeper is refused, not recursed into.
_MAX_DEPTH = 64
_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray)
_PLAIN_CONTAINERS = (tuple, list, set, frozenset)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except BaseException:
        return f"<{type(value).__qualname__} object>"


def plain(value: object, depth: int = 0) -> object:
    """Return `value` as plain data: containers of plain values as they are, anything else its repr.

    Used inside, on what an exception holds, so that it crosses as data. It
    never raises: a repr that raises becomes the type's name.
    """
    if isinstance(value, _PLAIN_SCALARS):
        return value
    if depth >= _MAX_DEPTH:
        return _safe_repr(value)
    if isinstance(value, dict):
        return {plain(k, depth + 1): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, _PLAIN_CONTAINERS):
        return type(value)(plain(item, depth + 1) for item in value)
    return _safe_repr(value)


def _format(exc: BaseException) -> str:
    import traceback  # only when an exception is sent: the server's start stays small

    try:
        return "".join(traceback.format_exception(exc))
    except BaseException:
        return f"{type(exc).__qualname__} (its traceback could not be formatted)\n"


class KillRequest(NamedTuple):
    """Caller to server: SIGKILL the container `pid`, if the server still has it unreaped.

    For a container whose pidfd the caller lost (it had no free fd): the
    server, its parent, can signal it without any race on the PID, which
    stays its own until it reaps it.
    """

    pid: int


class ExceptionInfo(NamedTuple):
    """An exception raised in another process, as data: its class's path, its arguments, its text.

    Never a pickle of the exception: the caller rebuilds it from a class it
    has already imported (`rebuild`), so that nothing from inside decides
    what code runs in the caller.
    """

    module: str
    qualname: str
    args: tuple[object, ...]
    # The exception's __dict__ (its notes and attributes), as plain data.
    attributes: dict[str, object]
    traceback: str

    @classmethod
    def capture(cls, exc: BaseException) -> ExceptionInfo:
        """Return the info for `exc`. Never raises, whatever `exc` does."""
        text = _format(exc)
        try:
            kind = type(exc)
            reduced = exc.__reduce__()
            args = reduced[1] if isinstance(reduced, tuple) and len(reduced) > 1 else exc.args
            state = reduced[2] if isinstance(reduced, tuple) and len(reduced) > 2 else None
            attributes = plain(state) if isinstance(state, dict) else {}
            return cls(
                str(kind.__module__),
                str(kind.__qualname__),
                tuple(plain(tuple(args))),  # type: ignore[arg-type]
                attributes,  # type: ignore[arg-type]
                text,
            )
        except BaseException:
            what = f"the container raised {_safe_repr(type(exc))}, which could not be sent back"
            return cls(ContainerError.__module__, ContainerError.__qualname__, (what,), {}, text)

    def rebuild(self, where: str = "") -> BaseException:
        """Return the exception, with the remote traceback (and `where`) attached as a note.

        Its class is looked up among the modules this process has imported;
        a class it lacks gives `UntrustedValueError`. KeyboardInterrupt,
        SystemExit and the other exceptions that are not `Exception`s come
        as a `ContainerError` whose cause they are: raised raw, they would
        stop the caller.
        """
        kind = _imported_exception_class(self.module, self.qualname)
        if kind is None:
            exc: BaseException = UntrustedValueError(
                f"the container raised {self.module}.{self.qualname}{_safe_repr(self.args)}, "
                "of a class this process has not imported; its traceback is in the note"
            )
        else:
            exc = _instantiate(kind, self.args, self.attributes)
        if not isinstance(exc, Exception):
            wrapped = ContainerError(
                f"the container raised {type(exc).__qualname__}{_safe_repr(exc.args)}, "
                "which is not raised here as it is (it would stop this process)"
            )
            wrapped.__cause__ = exc
            exc = wrapped
        exc.add_note(f"Raised in the container process{where}:\n{self.traceback.rstrip()}")
        return exc


def _imported_exception_class(module: str, qualname: str) -> type[BaseException] | None:
    """Return the exception class at module.qualname if this process has imported it."""
    found: object = sys.modules.get(module)
    for part in qualname.split("."):
        if found is None or part.startswith("<"):
            return None
        # The namespace itself, not getattr: a module's __getattr__ (PEP 562)
        # must not run, let alone import, for a name chosen inside.
        try:
            found = vars(found).get(part)
        except TypeError:
            return None
    if isinstance(found, type) and issubclass(found, BaseException):
        return found
    return None


def _instantiate(
    kind: type[BaseException], args: tuple[object, ...], attributes: dict[str, object]
) -> BaseException:
    try:
        exc = kind(*args)
    except Exception:
        # A class whose constructor wants other arguments: as pickle does.
        exc = kind.__new__(kind, *args)
        exc.args = args
    for name, value in attributes.items():
        if isinstance(name, str) and (name == "__notes__" or not name.startswith("__")):
            try:
                setattr(exc, name, value)
            except Exception:
                pass
    return exc


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that builds only the classes it is given: pickle's "Restricting Globals".

    The standard library documents this as the way to load pickles of
    untrusted origin as data: every class or function a pickle names goes
    through find_class, so one that answers only for plain types and known
    message classes can make nothing else run.
    """

    def __init__(self, data: bytes, allowed: dict[tuple[str, str], object]) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UntrustedValueError(
                f"what came back from the container names {module}.{name}, which is not "
                "plain data; a container can forge what it sends, so it is not unpickled here "
                "(pass trusted=True where offered to unpickle it anyway)"
            ) from None


_PLAIN_GLOBALS: dict[tuple[str, str], object] = {
    ("builtins", kind.__name__): kind for kind in (complex, bytearray, set, frozenset)
}


def decode_value(data: bytes) -> object:
    """Return a value that came from inside a container, decoded as plain data.

    Raises:
        UntrustedValueError: when it holds anything but plain values.
    """
    try:
        return _DataUnpickler(data, _PLAIN_GLOBALS).load()
    except UntrustedValueError:
        raise
    except Exception as exc:
        raise UntrustedValueError(
            f"what came back from the container is not a value: {exc}"
        ) from None


class Forked(NamedTuple):
    """Server to caller: the container process exists (fds: a pidfd for it)."""

    pid: int
    network: VethNetwork | None = None


class SpawnFailed(NamedTuple):
    """Server to caller: the container could not be created."""

    error: ExceptionInfo


class Exited(NamedTuple):
    """Server to caller: the container process was reaped with this returncode."""

    returncode: int
    # Read from its cgroups, for a container with limits=.
    usage: ResourceUsage | None = None
    # Processes it forked still run in its cgroup (it had no pid namespace):
    # the status socket stays open until `Emptied`, and a byte the caller
    # writes on it kills them (see _forkserver.lifetime).
    lingering: bool = False


class Emptied(NamedTuple):
    """Server to caller: the last process of a lingering container's cgroup has exited."""


class ContainerSetup(NamedTuple):
    """Caller to container: everything it needs (fds: stdin, stdout, stderr)."""

    plan: object  # a ContainerPlan; typed loosely to keep this module below the plan


class ExcursionSetup(NamedTuple):
    """Caller to excursion process: what to run (fds: stdin, stdout, stderr, target pidfd)."""

    plan: object  # an ExcursionPlan


class Returned(NamedTuple):
    """Excursion to caller: the callable returned this (cloudpickle bytes)."""

    pickled: bytes


class Raised(NamedTuple):
    """Excursion to caller: the callable raised this."""

    error: ExceptionInfo


class Ready(NamedTuple):
    """Container to caller: set-up done; the callable is about to run."""


class Execing(NamedTuple):
    """Container to caller: set-up done; exec follows (EOF means it worked)."""


class StepFailed(NamedTuple):
    """Container to caller: step `step` (an index into its plan) raised.

    An OSError comes as its errno and strerror (and the file name it named,
    if any), for the caller to rebuild naming the user's own path; any
    other exception comes as `error`. `traceback` is the child's.
    """

    step: int
    errno: int | None
    strerror: str | None
    filename: str | None
    error: ExceptionInfo | None
    traceback: str
    # From the C executor: what its errno alone cannot say (the mask of
    # the capabilities a LimitBoundingSet step missed).
    detail: int = 0


class SetupFailed(NamedTuple):
    """Container to caller: set-up or exec raised this."""

    error: ExceptionInfo


def encode_frame(message: object, nfds: int = 0) -> bytes:
    """Return the bytes of one stream frame holding `message`."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload), nfds) + payload


def fds_ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """Return the sendmsg() ancillary data that passes `fds` (SCM_RIGHTS)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def send_frame(sock: socket.socket, message: object, fds: Sequence[int] = ()) -> None:
    """Send one frame on a blocking stream socket, the fds with its first byte.

    Raises:
        OSError: BrokenPipeError when the peer is gone.
    """
    data = encode_frame(message, len(fds))
    sent = sock.sendmsg([data], fds_ancillary(fds))
    if sent < len(data):
        sock.sendall(data[sent:])


def unpack_fds(ancdata: list[tuple[int, int, bytes]], flags: int) -> tuple[list[int], bool]:
    """Return the fds of SCM_RIGHTS ancillary data, and whether some were lost.

    Some are lost when the kernel truncated the ancillary data (MSG_CTRUNC):
    the receiver had no free fd for them, and the kernel closed them.
    """
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds, bool(flags & socket.MSG_CTRUNC)


def recvmsg_fds(sock: socket.socket, size: int) -> tuple[bytes, list[int], bool]:
    """recvmsg() with room for MAX_FDS fds, received close-on-exec; also whether fds were lost."""
    # MSG_CMSG_CLOEXEC: an fd received without it would leak into whatever
    # the receiver executes next (Python sets O_CLOEXEC on fds it creates,
    # but not on those it receives).
    data, ancdata, flags, _ = sock.recvmsg(size, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds, lost = unpack_fds(ancdata, flags)
    return data, fds, lost


class FrameBuffer:
    """Reassembles frames from stream chunks and hands each its fds.

    The sans-I/O core shared by the blocking reader below and the async one
    in `_client`. fds are queued in arrival order and each frame takes as
    many as its header says, which stays right however the kernel splits
    the byte stream.
    """

    def __init__(self, loads: Callable[[bytes], object] = pickle.loads) -> None:
        self._data = bytearray()
        self._fds: list[int] = []
        self._loads = loads
        self._lost = False

    def feed(self, data: bytes, fds: Sequence[int], lost: bool = False) -> None:
        """Add received bytes and fds; `lost` says the kernel dropped fds sent with them.

        A frame whose fds were dropped is then handed out with fewer fds
        than its header says: the receiver decides what that means.
        """
        self._data += data
        self._fds.extend(fds)
        self._lost = self._lost or lost

    def next_frame(self) -> tuple[object, list[int]] | None:
        """Return the next complete (message, fds), or None if more bytes are needed."""
        if len(self._data) < _HEADER.size:
            return None
        length, nfds = _HEADER.unpack_from(self._data)
        end = _HEADER.size + length
        if len(self._data) < end or (len(self._fds) < nfds and not self._lost):
            return None
        if len(self._fds) < nfds:
            self._lost = False  # this frame's fds were the ones dropped
        payload = bytes(self._data[_HEADER.size : end])
        del self._data[:end]
        fds, self._fds = self._fds[:nfds], self._fds[nfds:]
        try:
            message = self._loads(payload)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return message, fds

    @property
    def pending(self) -> bool:
        """True while bytes of an unfinished frame are buffered."""
        return bool(self._data)

    def close(self) -> None:
        """Close every fd received but not yet handed out."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def recv_frame(sock: socket.socket, buffer: FrameBuffer) -> tuple[object, list[int]]:
    """Block until a whole frame arrives on a stream socket and return it with its fds.

    Raises:
        EOFError: when the peer closed the socket first.
    """
    while True:
        frame = buffer.next_frame()
        if frame is not None:
            return frame
        data, fds, lost = recvmsg_fds(sock, 65536)
        if not data and not fds:
            raise EOFError("the peer closed the socket")
        buffer.feed(data, fds, lost)


# What a container or an excursion may send its caller, and nothing else.
_REPLIES: dict[tuple[str, str], object] = {
    **_PLAIN_GLOBALS,
    **{
        (__name__, kind.__name__): kind
        for kind in (Ready, Execing, StepFailed, SetupFailed, Raised, Returned, ExceptionInfo)
    },
}


def decode_reply(data: bytes) -> object:
    """Return a message that came from a container's process, decoded as data.

    Only the reply messages of this module and plain values can be built:
    a process in a container's namespaces is in the container's hands, and
    may send anything.

    Raises:
        UntrustedValueError: for a pickle that names anything else.
    """
    if data[:4] in _C_RECORDS:
        return _c_record(data)
    return _DataUnpickler(data, _REPLIES).load()


# What the C executor sends (cexecutor.c): fixed records, not pickles
# (which start with b"\x80").
_C_EXECING = b"ACX1"
_C_FAILED = struct.Struct("<4siiq")
_C_RECORDS = (_C_EXECING, b"ACF1")


def _c_record(data: bytes) -> object:
    """Return the message of a C executor's record: Execing, or StepFailed."""
    if data == _C_EXECING:
        return Execing()
    if len(data) != _C_FAILED.size:
        raise UntrustedValueError(f"a malformed record of the C executor: {data[:32]!r}")
    _, index, number, detail = _C_FAILED.unpack(data)
    return StepFailed(index, number, None, None, None, "(in the C executor)", detail)


def call_and_send(fd: int, function: Callable[..., object], args: tuple[object, ...]) -> None:
    """Run `function(*args)` and write its value (or its exception) to the pipe `fd`; close it.

    The container's side of `to_container.run_sync`: the pipe holds one
    pickle, `Returned` (the value, pickled with cloudpickle) or `Raised`
    (the exception as data), which the caller decodes with `decode_reply`.
    """
    message: object
    try:
        value = function(*args)
    except BaseException as exc:
        message = Raised(ExceptionInfo.capture(exc))
    else:
        import cloudpickle

        try:
            message = Returned(cloudpickle.dumps(value))
        except BaseException as exc:
            error = TypeError(f"the value {type(value).__qualname__} cannot be pickled: {exc}")
            message = Raised(ExceptionInfo.capture(error))
    data = memoryview(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
    try:
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)
