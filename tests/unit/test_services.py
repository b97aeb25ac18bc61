from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

import pytest

from qrexec_trio.protocol import ExitStatus, parse_cmdline
from qrexec_trio.services import (
    LaunchError,
    ProgramPlan,
    Runner,
    ServiceKind,
    SocketPlan,
    find_service,
    service_path,
)


def _rpc(text: str):
    command = parse_cmdline(f"u:QUBESRPC {text}".encode()).command
    return command


def _script(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_lookup_prefers_svc_plus_arg_in_any_dir_over_svc(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    _script(first / "svc")
    specific = _script(second / "svc+arg")
    found = find_service(_rpc("svc+arg src"), [str(first), str(second)])
    assert found.path == str(specific)
    assert found.kind is ServiceKind.EXECUTABLE


def test_no_plus_is_looked_up_as_empty_argument_then_bare(tmp_path: Path) -> None:
    _script(tmp_path / "svc")
    assert find_service(_rpc("svc src"), [str(tmp_path)]).path == str(tmp_path / "svc")
    empty_arg = _script(tmp_path / "svc+")
    assert find_service(_rpc("svc src"), [str(tmp_path)]).path == str(empty_arg)


def test_missing_is_127_and_not_executable_is_125(tmp_path: Path) -> None:
    with pytest.raises(LaunchError) as missing:
        find_service(_rpc("nope src"), [str(tmp_path)])
    assert missing.value.status == ExitStatus.SERVICE_NOT_FOUND
    _script(tmp_path / "plain", mode=0o644)
    with pytest.raises(LaunchError) as plain:
        find_service(_rpc("plain src"), [str(tmp_path)])
    assert plain.value.status == ExitStatus.PROBLEM


def test_dangling_symlink_counts_as_absent(tmp_path: Path) -> None:
    (tmp_path / "svc").symlink_to(tmp_path / "nowhere")
    with pytest.raises(LaunchError) as error:
        find_service(_rpc("svc src"), [str(tmp_path)])
    assert error.value.status == ExitStatus.SERVICE_NOT_FOUND


def test_argument_cannot_climb_out_of_the_service_dir(tmp_path: Path) -> None:
    services = tmp_path / "rpc"
    services.mkdir()
    _script(tmp_path / "secret")
    # "svc+/../../secret" is not one path component: only "svc" may be used.
    with pytest.raises(LaunchError) as error:
        find_service(_rpc("../secret src"), [str(services)])
    assert error.value.status == ExitStatus.SERVICE_NOT_FOUND


def test_unix_socket_service(tmp_path: Path) -> None:
    path = tmp_path / "svc"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        runner = Runner([str(tmp_path)])
        plan = runner.plan(parse_cmdline(b"root:QUBESRPC svc+x dom0"))
    assert isinstance(plan, SocketPlan)
    assert plan.descriptor == b"svc+x dom0\0"


def test_service_environment_and_argv(tmp_path: Path) -> None:
    _script(tmp_path / "svc")
    runner = Runner([str(tmp_path)], base_env={"PATH": "/bin", "QREXEC_SECRET": "x",
                                               "QREXEC_SERVICE_PATH": "p", "NOTIFY_SOCKET": "n"})
    own = pwd.getpwuid(os.geteuid()).pw_name
    plan = runner.plan(parse_cmdline(f"{own}:QUBESRPC svc+a1 work".encode()))
    assert isinstance(plan, ProgramPlan)
    assert plan.argv == [str(tmp_path / "svc"), "a1"]
    assert plan.env["QREXEC_SERVICE_FULL_NAME"] == "svc+a1"
    assert plan.env["QREXEC_REMOTE_DOMAIN"] == "work"
    assert plan.env["QREXEC_SERVICE_ARGUMENT"] == "a1"
    assert plan.env["QREXEC_SERVICE_PATH"] == "p"
    assert "QREXEC_SECRET" not in plan.env and "NOTIFY_SOCKET" not in plan.env


def test_non_root_agent_runs_only_as_itself() -> None:
    nobody = pwd.getpwnam("nobody")
    runner = Runner([], base_env={}, euid=nobody.pw_uid)
    plan = runner.plan(parse_cmdline(b"nobody:echo hi"))
    assert isinstance(plan, ProgramPlan)
    assert plan.argv == ["/bin/sh", "-c", "echo hi"]
    assert plan.identity.uid is None
    with pytest.raises(LaunchError) as error:
        runner.plan(parse_cmdline(b"root:echo hi"))
    assert error.value.status == ExitStatus.PROBLEM


def test_root_agent_uses_the_users_login_shell() -> None:
    runner = Runner([], base_env={}, euid=0)
    plan = runner.plan(parse_cmdline(b"root:echo hi"))
    root = pwd.getpwnam("root")
    assert isinstance(plan, ProgramPlan)
    assert plan.executable == root.pw_shell
    assert plan.argv == ["-" + os.path.basename(root.pw_shell), "-c", "echo hi"]
    assert plan.env["HOME"] == root.pw_dir and plan.env["USER"] == "root"


def test_service_path_default_and_override() -> None:
    assert service_path({}) == ["/run/qubes-rpc", "/usr/local/etc/qubes-rpc", "/etc/qubes-rpc"]
    assert service_path({"QREXEC_SERVICE_PATH": "/a::/b"}) == ["/a", "/b"]
