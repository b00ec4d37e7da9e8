"""ContainerSpec: one definition of every option, shared by every entry point.

The spec's checks run when it is made (nothing is spawned); keywords given
beside a spec override its fields; services take the same options from the
same definition, and so do the command line and the services file.
"""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import anyio
import attrs
import pytest
from capture import output_of

import asynccontainer as ac
from asynccontainer._core import client as _client
from asynccontainer._services.file import load_services
from asynccontainer._spec.container import SharedOptions

SYSTEM = ac.HOST_SYSTEM_MAPPINGS


def test_every_option_is_a_keyword_of_the_typed_options() -> None:
    """ContainerOptions (the type of **options) names exactly the fields of ContainerSpec."""
    fields = {field.name for field in attrs.fields(ac.ContainerSpec)}
    assert set(typing.get_type_hints(ac.ContainerOptions)) == fields


def test_a_spec_is_frozen_hashable_and_picklable() -> None:
    spec = ac.ContainerSpec(hostname="box", env={"A": "1"}, limits={"memory": "64M"})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.hostname = "other"  # type: ignore[misc]
    assert hash(spec) == hash(pickle.loads(pickle.dumps(spec)))
    assert dict(spec.env or ()) == {"A": "1"}
    assert spec.limits is not None and spec.limits.memory == 64 << 20


def test_converters_are_idempotent() -> None:
    """Every field takes back what it holds: attrs.evolve passes every value again."""
    spec = ac.ContainerSpec(
        root="/",
        mounts=SYSTEM,
        namespaces=["mnt", "pid", "uts", "user"],
        env={"A": "1"},
        pass_fds=[5],
        capabilities=["net_bind_service"],
        limits={"pids": 5},
        hostname="h",
    )
    assert attrs.evolve(spec) == spec


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"hostname": "x", "namespaces": ["mnt"]}, ValueError, "needs the 'uts' namespace"),
        ({"limits": {}, "namespaces": ["mnt"]}, ValueError, "needs the 'pid' namespace"),
        ({"network": "veth", "namespaces": ["mnt"]}, ValueError, "needs the 'net' namespace"),
        ({"network": "bridge"}, ValueError, "network 'bridge' is not supported"),
        ({"root": ""}, ValueError, "root '' is relative"),
        ({"root": "."}, ValueError, r"root '\.' is relative"),
        ({"root": "rootfs"}, ValueError, "give the absolute path of a host directory"),
        ({"capabilities": ["cap_sys_admn"]}, ValueError, "did you mean 'CAP_SYS_ADMIN'"),
        ({"pass_fds": [1]}, ValueError, "1 is stdio"),
        ({"lock_mounts": 1}, TypeError, "lock_mounts must be True or False"),
    ],
)
def test_a_bad_spec_is_refused_when_made(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        ac.ContainerSpec(**options)  # type: ignore[arg-type]
    assert type(info.value) is error


async def test_a_relative_root_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """root="" and root="." once filled the caller's working directory with mount points."""
    ac.shutdown_fork_server()
    before = set(os.listdir(tmp_path))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for root in ("", ".", "sub"):
            with pytest.raises(ValueError, match="is relative"):
                await ac.run_container(["true"], root=root)
    finally:
        os.chdir(cwd)
    assert set(os.listdir(tmp_path)) == before
    assert _client._server is None


async def test_a_misspelt_keyword_is_a_type_error_naming_the_closest_option() -> None:
    ac.shutdown_fork_server()
    with pytest.raises(
        TypeError, match=r"unknown container option 'hostnam'; did you mean 'hostname'"
    ):
        await ac.run_container(["true"], hostnam="box")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"spec must be a ContainerSpec"):
        await ac.run_container(["true"], {"hostname": "box"})  # type: ignore[arg-type]
    assert _client._server is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: ac.ContainerSpec(hostnam="box"),
            "container option 'hostnam'; did you mean 'hostname'",
        ),
        # A service's spelling given to a container, and the other way round.
        (
            lambda: ac.ContainerSpec(mappings=()),
            "container option 'mappings'; did you mean 'mounts'",
        ),
        (
            lambda: ac.ServiceSpec(["true"], mounts=()),
            "service option 'mounts'; did you mean 'mappings'",
        ),
        (
            lambda: ac.ServiceSpec(["true"], env={}),
            "service option 'env'; did you mean 'environment'",
        ),
        (
            lambda: ac.ServiceSpec(["true"], cwd="/"),
            "service option 'cwd'; did you mean 'directory'",
        ),
        (
            lambda: ac.ServiceSpec(["true"], respwan=True),
            "service option 'respwan'; did you mean 'respawn'",
        ),
    ],
)
def test_a_spec_names_the_closest_option_to_a_misspelt_keyword(
    build: typing.Callable[[], object], message: str
) -> None:
    with pytest.raises(TypeError, match=f"^unknown {message}"):
        build()


def test_the_specs_keep_their_signatures_for_the_documentation() -> None:
    assert "hostname" in inspect.signature(ac.ContainerSpec).parameters
    assert next(iter(inspect.signature(ac.ServiceSpec).parameters)) == "command"
    assert ac.ServiceSpec(["true"], respawn=True).respawn


def test_a_misspelt_keyword_fails_the_type_checker(tmp_path: Path) -> None:
    program = tmp_path / "user.py"
    program.write_text(
        textwrap.dedent(
            """
            import asynccontainer as ac

            async def main() -> None:
                await ac.run_container(["true"], hostname="box", writable_root=True)
                await ac.run_container(["true"], hostnam="box")
                await ac.call_with_container(["true"], limits={"pids": 4}, lock_mount=False)
                await ac.run_container(["true"], hostname=5)
                await ac.run_process(["true"], mount=[])
                await ac.open_process(["cat"], capabilites=None)
                await ac.to_container.run_sync(len, "abc", writeable_root=True)
                result = await ac.run_process(["true"], input=b"x", check=False)
                count: int = await ac.to_container.run_sync(len, "abc")
                text: str = await ac.to_container.run_sync(len, "abc")
                value: int = await ac.container_excursion_value(1, lambda: 42)
                stdout: bytes = result.stdout
                print(count, value, text, stdout)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["6", "7", "8", "9", "10", "11", "14"], (
        result.stdout
    )
    assert '"hostnam"' in errors[0] and '"lock_mount"' in errors[1], result.stdout
    assert '"mount"' in errors[3] and '"capabilites"' in errors[4], result.stdout
    assert '"writeable_root"' in errors[5], result.stdout
    assert '"run_sync" has incompatible type' in errors[6], result.stdout  # it is generic


async def test_keywords_override_the_spec() -> None:
    spec = ac.ContainerSpec(mounts=SYSTEM, hostname="from-spec", env={"WHO": "spec"})
    _, out = await output_of(["sh", "-c", "hostname; echo $WHO"], spec=spec)
    assert out.split() == ["from-spec", "spec"]
    _, out = await output_of(["sh", "-c", "hostname; echo $WHO"], spec=spec, hostname="kw")
    assert out.split() == ["kw", "spec"]
    status = await ac.call_with_container(["sh", "-c", "exit 7"], spec)
    assert status == 7


# -- services take the same options ---------------------------------------------


def test_service_specs_share_every_container_option() -> None:
    """Every field services share is defined once, in SharedOptions."""
    shared = {field.name for field in attrs.fields(SharedOptions)}
    container = {field.name for field in attrs.fields(ac.ContainerSpec)}
    service = {field.name for field in attrs.fields(ac.ServiceSpec)}
    assert shared <= container and shared <= service
    # What a container names otherwise, or a service always does.
    assert container - shared == {"mounts", "env", "cwd", "child_is_pid1", "new_session"}
    for name in shared - {"namespaces", "writable_root"}:
        assert attrs.fields_dict(ac.ServiceSpec)[name] is not None
        assert (
            attrs.fields_dict(ac.ServiceSpec)[name].validator
            is attrs.fields_dict(ac.ContainerSpec)[name].validator
        )
        assert (
            attrs.fields_dict(ac.ServiceSpec)[name].converter
            is attrs.fields_dict(ac.ContainerSpec)[name].converter
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mappings": [ac.FileSystemMapping("/usr")], "namespaces": ["pid"]}, "mappings= needs"),
        ({"root": "/", "namespaces": ["pid"]}, "root= needs the 'mnt' namespace"),
        ({"hostname": "x", "namespaces": ["mnt"]}, "hostname= needs the 'uts'"),
        ({"guest_uid": 5}, "add 'user' to namespaces"),
    ],
)
def test_a_service_spec_refuses_what_its_start_would(
    options: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ac.ServiceSpec(["true"], **options)  # type: ignore[arg-type]


async def test_a_service_without_a_mount_namespace_starts() -> None:
    """It gets no default mounts (they need "mnt"), rather than failing at its start."""
    async with ac.ServiceGroup() as group:
        service = await group.start(ac.ServiceSpec(["sleep", "30"], namespaces=["pid", "uts"]))
        assert service.running


@pytest.mark.parametrize("lock_mounts", [True, False])
async def test_a_service_takes_the_container_options(tmp_path: Path, lock_mounts: bool) -> None:
    """hostname, pass_fds, populate, lock_mounts and root reach a service's container."""
    log = tmp_path / "log"
    read_end, write_end = os.pipe()

    def populate() -> None:
        with open("/populated", "w") as file:
            file.write("yes\n")

    script = (
        f"hostname; cat /populated; echo via-fd > /proc/self/fd/{write_end}; "
        # EINVAL, which umount(8) words "not mounted", for a locked mount.
        "umount -l /usr 2>/dev/null && echo unlocked || echo locked; sleep 30"
    )
    spec = ac.ServiceSpec(
        ["sh", "-c", script],
        namespaces=[*ac.default_namespaces(), "user"],
        hostname="service-box",
        pass_fds=[write_end],
        populate=populate,
        capabilities=None,
        lock_mounts=lock_mounts,
        log_file=str(log),
    )
    try:
        async with ac.ServiceGroup() as group:
            await group.start(spec)
            with anyio.fail_after(10):
                await anyio.wait_readable(read_end)
            assert os.read(read_end, 100) == b"via-fd\n"
            with anyio.fail_after(10):
                while "locked" not in log.read_text():
                    await anyio.sleep(0.01)
    finally:
        os.close(read_end)
        os.close(write_end)
    lines = [line.split(" ", 2)[2] for line in log.read_text().splitlines()]
    assert lines[:3] == ["service-box", "yes", "locked" if lock_mounts else "unlocked"]


async def test_a_service_with_a_root_of_its_own(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "marker").write_text("in the root\n")
    log = tmp_path / "log"
    spec = ac.ServiceSpec(["cat", "/data/marker"], root=str(root), log_file=str(log))
    async with ac.ServiceGroup() as group:
        service = await group.start(spec)
        assert await service.wait() == 0
    assert log.read_text().endswith(" in the root\n")


# -- the services file -------------------------------------------------------------


def test_the_services_file_takes_a_spec_whose_fields_depend_on_each_other(tmp_path: Path) -> None:
    """Fields valid together are not refused one by one (network needs "net" among namespaces)."""
    path = tmp_path / "services.toml"
    path.write_text(
        textwrap.dedent(
            """
            [services.web]
            command = ["true"]
            namespaces = ["mnt", "pid", "uts", "net"]
            network = "veth"
            hostname = "web"
            limits = { pids = 8 }
            capabilities = ["net_bind_service"]
            seccomp = { deny = ["mount"] }

            [services.bad]
            command = ["true"]
            hostname = "x"
            namespaces = ["mnt"]
            """
        )
    )
    specs, errors = load_services(str(path))
    assert len(errors) == 1, errors
    # The rule is reported on the line of the field it names first.
    assert errors[0].startswith(f"{path}:13: services.bad.hostname: hostname= needs"), errors
    [web] = specs
    assert web.network == "veth" and web.hostname == "web"
    assert web.seccomp == ac.SeccompPolicy(deny=frozenset({"mount"}))
    assert web.capabilities == frozenset({"CAP_NET_BIND_SERVICE"})


def test_the_services_file_refuses_python_only_options(tmp_path: Path) -> None:
    path = tmp_path / "services.toml"
    path.write_text('[services.x]\ncommand = ["true"]\npopulate = "f"\n')
    _, errors = load_services(str(path))
    assert errors == [
        f"{path}:3: services.x.populate: populate is a Python callable; "
        "it cannot be given in a services file"
    ]


async def test_the_command_line_takes_its_defaults_from_the_spec() -> None:
    result = await anyio.run_process(
        [sys.executable, "-m", "asynccontainer", "run", "--", "sh", "-c", "id -u; id -g"],
        check=False,
    )
    assert result.stdout.decode().split() == [str(ac.ContainerSpec().guest_uid)] * 2
