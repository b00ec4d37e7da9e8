"""What the container process does between clone() and running its target.

This is Guix's run-container child branch. It runs in a copy of the fork
server (single-threaded, so the copy is sound), never returns, and always
ends in exec or `os._exit`: nothing of the server's state may run again here,
not even its finalizers.
"""

from __future__ import annotations

# Everything the container process uses is imported here, when the server
# starts: after pivot_root the host's standard library is out of reach.
import fcntl
import os
import signal
import socket
import termios
from typing import NoReturn

from .. import _kernel
from .._kernel.seccomp import install_filter
from .._plan import ContainerConfig, ExcursionConfig
from .._wire import (
    ContainerSetup,
    ExceptionInfo,
    ExcursionSetup,
    FrameBuffer,
    SetupFailed,
    recv_frame,
    recvmsg_fds,
)
from .capabilities import keep_only, limit_bounding_set
from .excursion import run_excursion
from .init import apply_service_process_state, prepare_service_root, run_init
from .mounts import bring_loopback_up, lock_mounts, mount_file_systems
from .target import (
    EXIT_PARENT_DIED,
    EXIT_SETUP_FAILED,
    install_stdio,
    report,
    run_target,
    unpickle,
)

__all__ = ["container_main"]


# Signals the server ignores or handles, restored to their defaults: an
# ignored disposition survives execve(2), and subprocess resets these too.
_RESET_SIGNALS = (
    signal.SIGCHLD,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGTERM,
)


def _close_fds_except(keep: set[int]) -> None:
    """Close every fd above 2 but those in `keep` (the server's sockets above all)."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)


def _reset_process_state() -> None:
    signal.set_wakeup_fd(-1)
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def container_main(go_fd: int) -> NoReturn:
    """Run the container's side of the handshake, set it up, run its target.

    Never returns: the process execs the command, or exits with the
    callable's status (0, or 1 after printing its traceback), or with
    EXIT_PARENT_DIED, EXIT_SETUP_FAILED or EXIT_EXEC_FAILED.
    """
    try:
        _reset_process_state()
        # Die with the server; and since PR_SET_PDEATHSIG is not inherited
        # across fork, a container with a pid namespace takes its whole
        # namespace down with it (its PID 1 dying kills the rest).
        _kernel.prctl(_kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        _close_fds_except({go_fd})
        _kernel.set_process_name("ac-zygote")
        # Wait until the server has written the id maps (Guix's "ready")
        # and handed over the handshake socket. End-of-file means the
        # server died or gave up on us.
        go = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, go_fd)
        data, fds = recvmsg_fds(go, 16)
        go.close()
        if data != b"g" or len(fds) != 1:
            os._exit(EXIT_PARENT_DIED)
        handshake_fd = fds[0]
        _kernel.set_process_name("ac-container")
    except BaseException:
        os._exit(EXIT_PARENT_DIED)

    # Family and type given, or socket() would ask the kernel for them.
    handshake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, handshake_fd)
    try:
        message, fds = recv_frame(handshake, FrameBuffer())
    except BaseException:
        os._exit(EXIT_PARENT_DIED)
    if isinstance(message, ContainerSetup) and isinstance(message.config, ContainerConfig):
        _container(handshake, message.config, fds)
    if isinstance(message, ExcursionSetup) and isinstance(message.config, ExcursionConfig):
        run_excursion(handshake, message.config, fds)
    os._exit(EXIT_PARENT_DIED)


def _lift(fd: int, floor: int) -> int:
    """Move `fd` to the lowest free number from `floor` up (close-on-exec); return it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    os.close(fd)
    return moved


def _install_passed_fds(received: list[int], targets: tuple[int, ...]) -> None:
    """Put each received fd at its number in the container (subprocess's pass_fds).

    Every one is first lifted above all the targets, so that no dup2 can
    overwrite one not yet placed.
    """
    floor = max(targets) + 1
    lifted = [_lift(fd, floor) for fd in received]
    for fd, number in zip(lifted, targets, strict=True):
        os.dup2(fd, number)  # inheritable, as the target must receive it
    for fd in lifted:
        os.close(fd)


def _container(handshake: socket.socket, config: ContainerConfig, fds: list[int]) -> NoReturn:
    stdio, passed = fds[:3], fds[3:]
    try:
        if config.pass_fds:
            # Out of the way of the numbers the passed fds will take.
            floor = max(config.pass_fds) + 1
            handshake = socket.socket(
                socket.AF_UNIX, socket.SOCK_STREAM, 0, _lift(handshake.detach(), floor)
            )
        if config.cgroup_namespace:
            # cgroup_namespaces(7): the new namespace's root is the cgroup
            # the process is in, which the server made for it.
            _kernel.unshare(_kernel.CLONE_NEWCGROUP)
        target = _set_up(config, stdio)
        if config.pass_fds:
            _install_passed_fds(passed, config.pass_fds)
        service = config.service
        if (service is not None and service.init) or (
            not config.child_is_pid1 and "pid" in config.namespaces
        ):
            # PID 1 stays as the init; the target runs in its child. The
            # init leaves the caller's session too: a terminal's Ctrl-C
            # must reach the target only through the caller.
            if service is None and config.new_session:
                os.setsid()
            child = os.fork()
            if child != 0:
                handshake.close()
                run_init(None if service is not None else child)
        kept = None
        if config.capabilities is not None:
            # Before the service's setuid, which needs CAP_SETUID and would
            # clear the permitted set without PR_SET_KEEPCAPS.
            kept = limit_bounding_set(
                config.capabilities,
                config.capabilities_required,
                switching_user=service is not None and service.uid is not None,
            )
        if service is not None:
            apply_service_process_state(service)
        elif config.new_session:
            _start_session()
        if config.no_new_privs:
            # execve(2) can no longer grant privileges: setuid and setgid
            # bits and file capabilities are ignored (prctl(2)); a container
            # whose root can write files must not be able to make its own
            # setuid programs work. Set in the target, after the set-up.
            _kernel.prctl(_kernel.PR_SET_NO_NEW_PRIVS, 1)
        # The filter comes last, since every set-up step may need what it
        # denies; but without no_new_privs, loading it takes CAP_SYS_ADMIN
        # (seccomp(2)), so it then comes before the capabilities go.
        if config.no_new_privs and kept is not None:
            keep_only(kept)
        if config.seccomp_program is not None:
            install_filter(config.seccomp_program)
        if not config.no_new_privs and kept is not None:
            keep_only(kept)
    except BaseException as exc:
        report(handshake, SetupFailed(ExceptionInfo.capture(exc)))
        os._exit(EXIT_SETUP_FAILED)
    run_target(handshake, config.command, target, dict(config.env), config.send_root)


def _start_session() -> None:
    """Become a session leader; take a terminal on stdin as the controlling terminal.

    In a session of its own the target cannot reach the caller's terminal
    (no TIOCSTI into it, no signals from its keyboard), and a terminal it
    is given (a pty) works fully: job control, Ctrl-C, window size.
    """
    os.setsid()
    if os.isatty(0):
        try:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        except PermissionError:
            # tty_ioctl(4): the terminal is another session's (the caller's
            # own, shared through stdin=None); with 0 as its argument the
            # call never steals it, even with CAP_SYS_ADMIN.
            pass


def _set_up(config: ContainerConfig, stdio: list[int]) -> object:
    """Do every set-up step of the container; return the unpickled callable (or None)."""
    target = unpickle(config.pickled_callable, config.sys_path)
    populate = unpickle(config.pickled_populate, config.sys_path)
    service = config.service
    if service is not None:
        # Shepherd's steps that need a writable root come before the user's
        # populate hook, while the root is still writable.
        user_populate = populate

        def populate() -> None:
            assert service is not None
            prepare_service_root(service)
            if callable(user_populate):
                user_populate()

    install_stdio(stdio)

    if config.hostname is not None:
        _kernel.sethostname(config.hostname)
    proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if "mnt" in config.namespaces:
            mount_file_systems(
                root=config.root,
                mounts=config.mounts,
                namespaces=config.namespaces,
                writable_root=config.writable_root,
                populate=populate,  # type: ignore[arg-type]
                write_hosts="net" in config.namespaces and config.loopback_network,
            )
        if "net" in config.namespaces and config.loopback_network:
            bring_loopback_up()
        if config.lock_mounts and {"mnt", "user"} <= config.namespaces:
            lock_mounts(proc_fd)
    finally:
        os.close(proc_fd)
    if service is not None and "mnt" not in config.namespaces:
        prepare_service_root(service)
    os.chdir(config.cwd)
    return target
