"""The default seccomp filter, and policies of one's own.

Guards against kernel exploits reached through system calls no container
needs: the kernel keyring (not namespaced; CVE-2016-0728), userfaultfd (a
staple of use-after-free exploits, e.g. CVE-2021-22555's), open_by_handle_at
(the "shocker" escape from Docker containers, 2014), and new user
namespaces when a policy forbids them (the entry point of many privilege
escalations, e.g. CVE-2022-0185).
"""

from __future__ import annotations

import errno

import pytest
from capture import sh

import asynccontainer as ac

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


def errno_of(name: str, *arguments: int) -> int:
    """Return the errno the system call `name` fails with here (0 if it succeeds)."""
    import ctypes

    from asynccontainer._kernel import seccomp as _seccomp

    number = _seccomp.LIB.seccomp_syscall_resolve_name(name.encode())
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(number, *arguments, 0, 0, 0, 0, 0)
    return ctypes.get_errno() if result < 0 else 0


@pytest.mark.parametrize(
    "name", ["keyctl", "add_key", "userfaultfd", "open_by_handle_at", "io_uring_setup"]
)
async def test_default_filter_denies(name: str) -> None:
    assert await ac.call_with_container(lambda: errno_of(name) == errno.EPERM or exit(9)) == 0


async def test_without_a_filter_the_call_reaches_the_kernel() -> None:
    """The control: keyctl(0, 0) is EINVAL from the kernel itself, not EPERM."""

    def check() -> None:
        raise SystemExit(errno_of("keyctl"))

    assert await ac.call_with_container(check, seccomp=None) == errno.EINVAL


async def test_programs_run_under_the_default_filter() -> None:
    assert await sh("ls / > /dev/null && echo fine") == (0, "fine\n")


async def test_a_policy_of_ones_own() -> None:
    policy = ac.SeccompPolicy(deny=ac.DEFAULT_SECCOMP.deny | {"mkdir", "mkdirat"})
    _, out = await sh(
        "mkdir /tmp/x 2>&1; echo $?", seccomp=policy, mounts=[*SYSTEM, ac.WRITABLE_TMP]
    )
    assert "Operation not permitted" in out
    assert out.split()[-1] != "0"


async def test_new_user_namespaces_can_be_forbidden() -> None:
    script = "unshare --user true 2>&1; echo $?"
    allowed = await sh(script)
    assert allowed[1].split()[-1] == "0"
    forbidden = await sh(script, seccomp=ac.SeccompPolicy(allow_user_namespaces=False))
    assert "Operation not permitted" in forbidden[1]


async def test_services_get_the_filter() -> None:
    from asynccontainer._kernel import seccomp as _seccomp

    keyctl = _seccomp.LIB.seccomp_syscall_resolve_name(b"keyctl")
    # Exits 0 only if keyctl fails with EPERM, the filter's answer.
    probe = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        f"failed = libc.syscall({keyctl}, 0, 0, 0, 0, 0) < 0; "
        "sys.exit(0 if failed and ctypes.get_errno() == 1 else 3)"
    )
    async with ac.ServiceGroup() as group:
        service = await group.start(ac.ServiceSpec(["python3", "-c", probe]))
        assert await service.wait() == 0


def test_unknown_system_call_names_are_refused() -> None:
    with pytest.raises(ValueError, match="no_such_call"):
        ac.SeccompPolicy(deny={"no_such_call"})
    with pytest.raises(TypeError):
        ac.SeccompPolicy(deny="keyctl")  # type: ignore[arg-type]


async def test_seccomp_must_be_a_policy() -> None:
    with pytest.raises(TypeError, match="SeccompPolicy"):
        await ac.run_container(["true"], seccomp="default")  # type: ignore[arg-type]
