"""The services' value classes behave as the dataclasses and enum they replaced.

They are light records and a light enum (src/qrexec_trio/_light.py), and
:class:`Runner` a plain class, so that the multiplexer starts fast (issue 14).
The agent and the daemon still treat plans as dataclasses
(``dataclasses.replace``), and compare and print them.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from qrexec_trio.services import (
    CALL_ID_ENV,
    DEFAULT_CONFIG,
    FoundService,
    Identity,
    ProgramPlan,
    Runner,
    ServiceConfig,
    ServiceKind,
    SocketPlan,
    TcpPlan,
    with_call_id,
)
from qrexec_trio.services._rpc_config import ParsedConfig, parse_rpc_config


def _plan() -> ProgramPlan:
    return ProgramPlan(["/bin/true"], {"PATH": "/bin"}, Identity(name="user"), what="svc")


def test_records_compare_by_value_and_print_their_fields() -> None:
    assert _plan() == _plan()
    assert _plan() != dataclasses.replace(_plan(), what="other")
    assert repr(Identity(name="user")) == (
        "Identity(name='user', uid=None, gid=None, groups=(), home=None, shell='/bin/sh')")
    assert ServiceConfig() == DEFAULT_CONFIG
    assert hash(ServiceConfig(force_user="u")) == hash(ServiceConfig(force_user="u"))
    assert FoundService("/p", ServiceKind.TCP, "/dev/tcp") == FoundService(
        "/p", ServiceKind.TCP, link="/dev/tcp")


@pytest.mark.parametrize("record", [
    _plan(), Identity(name="user"), SocketPlan("/s", b""), TcpPlan("::1", 22, b""),
    DEFAULT_CONFIG, FoundService("/p", ServiceKind.EXECUTABLE), ParsedConfig(DEFAULT_CONFIG),
])
def test_records_are_frozen(record: object) -> None:
    # FrozenInstanceError, the stdlib's or the light one: both are AttributeErrors.
    first = dataclasses.fields(record)[0].name  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match="cannot assign to field"):
        setattr(record, first, "changed")


def test_dataclasses_functions_work_on_plans() -> None:
    # The agent's launch code changes a plan's environment with dataclasses.replace.
    changed = dataclasses.replace(_plan(), env={"A": "1"})
    assert changed.env == {"A": "1"} and changed.argv == ["/bin/true"]
    assert [field.name for field in dataclasses.fields(SocketPlan)] == [
        "path", "descriptor", "what", "exit_on_service_eof", "exit_on_client_eof"]


def test_with_call_id_adds_the_id_to_a_programs_environment_only() -> None:
    plan = with_call_id(_plan(), "0:513")
    assert isinstance(plan, ProgramPlan)
    assert plan.env == {"PATH": "/bin", CALL_ID_ENV: "0:513"}
    assert _plan().env == {"PATH": "/bin"}
    socket_plan = SocketPlan("/s", b"")
    assert with_call_id(socket_plan, "0:513") is socket_plan


def test_a_tcp_plans_address_brackets_ipv6() -> None:
    assert TcpPlan("::1", 22, b"").address == "[::1]:22"
    assert TcpPlan("127.0.0.1", 22, b"").address == "127.0.0.1:22"


def test_service_kinds_are_found_by_value() -> None:
    assert ServiceKind("tcp") is ServiceKind.TCP
    assert [kind.name for kind in ServiceKind] == ["EXECUTABLE", "SOCKET", "TCP", "SCRIPT"]
    with pytest.raises(ValueError):
        ServiceKind("fifo")


def test_parsed_config_keys_set_fields_and_warnings_default_to_empty() -> None:
    parsed = parse_rpc_config(b"force-user = 'u'\nexit-on-client-eof = true\n")
    assert parsed.config == ServiceConfig(force_user="u", exit_on_client_eof=True)
    assert parsed.warnings == ()
    assert ParsedConfig(DEFAULT_CONFIG).warnings == ()


def test_a_runner_defaults_to_this_processs_environment_and_euid(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QREXEC_TEST_MARK", "1")
    runner = Runner(["/srv"])
    assert runner.base_env == dict(os.environ)
    assert runner.base_env is not os.environ  # a copy, taken when the runner is made
    assert runner.euid == os.geteuid()
    assert (runner.allow_scripts, runner.shell) == (False, "/bin/sh")
    monkeypatch.setenv("QREXEC_TEST_MARK", "2")
    assert runner.base_env["QREXEC_TEST_MARK"] == "1"


def test_a_runner_takes_its_settings_by_position_or_keyword() -> None:
    runner = Runner(["/srv"], {"A": "1"}, 0, True, "/bin/bash")
    assert (runner.directories, runner.base_env, runner.euid) == (["/srv"], {"A": "1"}, 0)
    assert (runner.allow_scripts, runner.shell) == (True, "/bin/bash")
    keyword = Runner(directories=["/srv"], base_env={}, euid=0, allow_scripts=True, shell="x")
    assert repr(keyword) == ("Runner(directories=['/srv'], base_env={}, euid=0, "
                             "allow_scripts=True, shell='x')")
