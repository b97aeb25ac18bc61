"""The policy agent's requests and answers (policy.Ask, policy.Notify), and dom0
calling its own agent service; the end-to-end paths are in tests/e2e/test_policy_agent.py."""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import threading
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from qrexec_trio._config import Timeouts
from qrexec_trio.policy import (
    Action,
    Decision,
    DomainInfo,
    Request,
    SystemInfo,
    agent_domain,
    agent_icons,
    apply_agent_answer,
    ask_request,
    encode_request,
    failure_notice,
    notify_request,
    parse_agent_answer,
    resolve_ask,
)
from qrexec_trio.roles.policy_agent import PolicyAgentCaller, valid_agent_name

from .helpers import SYSTEM, decide, one_file

POLICY = """\
test.Svc * work vault deny
test.Svc * work @anyvm ask default_target=personal
test.Told * work @anyvm ask notify=yes
test.Allow * work personal allow notify=yes
test.Quiet * work vault deny notify=no
test.Deny * work vault deny
"""

ICONS = {
    "dom0": "adminvm-black", "work": "appvm-black", "personal": "appvm-black",
    "vault": "appvm-black", "fedora": "templatevm-black", "dvm": "appvm-black",
    "disp7": "dispvm-black", "@dispvm:dvm": "dispvm-black",
}


def _asked(tmp_path: Path, call: str = "test.Svc+arg", target: str = "@default") -> Decision:
    decision = decide(one_file(tmp_path, POLICY), "work", target, call)
    assert decision.action is Action.ASK
    return decision


# --- policy.Ask: the request ------------------------------------------------------------


def test_ask_request_is_the_references_json(tmp_path: Path) -> None:
    request = ask_request(_asked(tmp_path), SYSTEM)
    assert request == {
        "source": "work",
        "service": "test.Svc",
        "argument": "+arg",
        "targets": ["disp7", "dvm", "fedora", "personal", "@dispvm:dvm"],
        "default_target": "personal",
        "icons": ICONS,
    }
    assert json.loads(encode_request(request)) == request


def test_ask_request_without_argument_or_default(tmp_path: Path) -> None:
    request = ask_request(_asked(tmp_path, "test.Told"), SYSTEM)
    assert request["argument"] == "+"
    assert request["default_target"] == ""


def test_icons_are_the_domains_own_and_dispvm_ones_derived() -> None:
    system = SystemInfo.of([
        DomainInfo("dom0", "AdminVM", icon="adminvm-black"),
        DomainInfo("work", "AppVM", icon="appvm-red"),
        DomainInfo("dvm", "AppVM", icon="appvm-green", template_for_dispvms=True),
    ])
    assert agent_icons(system) == {"dom0": "adminvm-black", "work": "appvm-red",
                                   "dvm": "appvm-green", "@dispvm:dvm": "dispvm-green"}


def test_request_is_ascii_json() -> None:
    assert encode_request({"source": "w\u00e9rk"}) == b'{"source": "w\\u00e9rk"}'


# --- where the agent is -----------------------------------------------------------------


def test_agent_is_the_guivm_else_the_default() -> None:
    system = SystemInfo.of([
        DomainInfo("dom0", "AdminVM"),
        DomainInfo("work", "AppVM", guivm="sys-gui"),
        DomainInfo("odd", "AppVM", guivm="-rf"),
        DomainInfo("plain", "AppVM"),
    ])
    assert agent_domain("work", system, "dom0") == "sys-gui"
    assert agent_domain("plain", system, "dom0") == "dom0"
    assert agent_domain("unknown", system, "dom0") == "dom0"
    assert agent_domain("odd", system, "dom0") == "dom0"  # never a non-name
    assert agent_domain("plain", system, None) is None
    assert agent_domain("plain", system, "") is None


def test_policy_agent_option_values() -> None:
    assert valid_agent_name("dom0") and valid_agent_name("sys-gui") and valid_agent_name("")
    assert not valid_agent_name("-d") and not valid_agent_name("a b")


# --- policy.Ask: the answer ---------------------------------------------------------------


@pytest.mark.parametrize(("raw", "target"), [
    (b"allow:personal", "personal"),
    (b"allow:personal\n", "personal"),  # a shell agent's echo
    (b"allow:@dispvm:dvm", "@dispvm:dvm"),
])
def test_allow_answers(raw: bytes, target: str) -> None:
    assert parse_agent_answer(raw, ["personal", "@dispvm:dvm"]).target == target


def test_deny_answer_is_a_decline() -> None:
    answer = parse_agent_answer(b"deny", ["personal"])
    assert answer.declined and answer.problem is None


@pytest.mark.parametrize(("raw", "problem"), [
    (b"allow:vault", "not offered"),
    (b"allow:", "not offered"),
    (b"allow:personal\n\n", "not offered"),
    (b"allow: personal", "not offered"),
    (b"ALLOW:personal", "invalid answer"),
    (b"yes", "invalid answer"),
    (b"deny\n\n", "invalid answer"),
    (b"", "empty answer"),
    (b"allow:pers\xffonal", "not ASCII"),
    (b"allow:" + b"x" * 300, "longer than"),
])
def test_anything_else_is_a_problem(raw: bytes, problem: str) -> None:
    answer = parse_agent_answer(raw, ["personal"])
    assert answer.target is None
    assert answer.problem is not None and problem in answer.problem


def test_answers_resolve_the_ask_with_the_references_notify(tmp_path: Path) -> None:
    asked = _asked(tmp_path, "test.Told")
    allowed = apply_agent_answer(asked, parse_agent_answer(b"allow:personal", asked.ask_targets))
    assert (allowed.action, allowed.target, allowed.notify) == (Action.ALLOW, "personal", True)
    declined = apply_agent_answer(asked, parse_agent_answer(b"deny", asked.ask_targets))
    assert (declined.action, declined.notify) == (Action.DENY, True)
    quiet = _asked(tmp_path)  # no notify= on this ask rule
    assert not apply_agent_answer(quiet, parse_agent_answer(b"allow:personal",
                                                            quiet.ask_targets)).notify
    assert not apply_agent_answer(quiet, parse_agent_answer(b"deny", quiet.ask_targets)).notify
    # Not an answer: a deny that notifies, whatever the rule says.
    garbage = apply_agent_answer(quiet, parse_agent_answer(b"maybe", quiet.ask_targets))
    assert (garbage.action, garbage.notify) == (Action.DENY, True)
    assert garbage.reason.startswith("ask: invalid answer")


def test_assume_yes_keeps_the_ask_rules_notify(tmp_path: Path) -> None:
    told = resolve_ask(_asked(tmp_path, "test.Told", "personal"), assume_yes=True, prompt=None)
    assert (told.action, told.notify) == (Action.ALLOW, True)


# --- policy.Notify ------------------------------------------------------------------------


def test_notifications_follow_the_rules(tmp_path: Path) -> None:
    cache = one_file(tmp_path, POLICY)
    allowed = decide(cache, "work", "personal", "test.Allow+x")
    assert notify_request(allowed) == {"resolution": "allow", "service": "test.Allow",
                                       "argument": "+x", "source": "work",
                                       "target": "personal"}
    denied = decide(cache, "work", "vault", "test.Deny")
    assert notify_request(denied) == {"resolution": "deny", "service": "test.Deny",
                                      "argument": "+", "source": "work", "target": "vault"}
    assert notify_request(decide(cache, "work", "vault", "test.Quiet")) is None
    assert notify_request(decide(cache, "work", "vault", "test.None")) is not None  # no rule
    assert notify_request(_asked(tmp_path, "test.Told")) is None  # not decided yet
    assert notify_request(dataclasses.replace(allowed, notify=False)) is None


def test_deny_names_the_target_as_requested(tmp_path: Path) -> None:
    denied = decide(one_file(tmp_path, POLICY), "work", "@default", "test.Deny")
    notice = notify_request(denied)
    assert notice is not None and notice["target"] == "@default"


def test_failure_notice() -> None:
    assert failure_notice("work", "@dispvm:dvm", "test.Svc", "") == {
        "resolution": "fail", "service": "test.Svc", "argument": "+", "source": "work",
        "target": "@dispvm:dvm"}


# --- dom0 asking its own service ---------------------------------------------------------


def _caller(default: str | None = "dom0", **timeouts: float) -> PolicyAgentCaller:
    return PolicyAgentCaller(default, socket_dir="/nonexistent",
                             timeouts=Timeouts().replace(**timeouts))


def _program_service(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(
        f"#!{sys.executable}\nimport os, sys, time\n"
        "data = sys.stdin.buffer.read()\n"
        f"open({str(path) + '.in'!r}, 'wb').write(data)\n"
        f"open({str(path) + '.env'!r}, 'w').write(os.environ.get('QREXEC_SERVICE_FULL_NAME','')"
        " + ' ' + os.environ.get('QREXEC_REMOTE_DOMAIN', ''))\n"
        f"{body}\n")
    path.chmod(0o755)
    return path


def _recorded(service: Path) -> tuple[object, str]:
    """What a stand-in service got: its input (JSON), and its name and caller."""
    return (json.loads(Path(f"{service}.in").read_bytes()),
            Path(f"{service}.env").read_text())


@pytest.fixture
def dom0_rpc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "rpc"
    directory.mkdir()
    monkeypatch.setenv("QREXEC_SERVICE_PATH", str(directory))
    return directory


async def test_dom0_program_service_gets_the_json_and_answers(tmp_path: Path,
                                                              dom0_rpc: Path) -> None:
    service = _program_service(dom0_rpc, "policy.Ask", "sys.stdout.write('allow:personal')")
    asked = _asked(tmp_path)
    decision = await _caller().ask(asked, SYSTEM)
    assert (decision.action, decision.target) == (Action.ALLOW, "personal")
    assert _recorded(service) == (ask_request(asked, SYSTEM), "policy.Ask dom0")


def _socket_service(path: Path, answer: bytes) -> tuple[threading.Thread, list[bytes]]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(20)
    got: list[bytes] = []

    def serve() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                data = b""
                while chunk := connection.recv(4096):
                    data += chunk
                got.append(data)
                connection.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread, got


async def test_dom0_socket_service_gets_the_descriptor_then_the_json(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QREXEC_SERVICE_PATH", str(short_tmp))
    thread, got = _socket_service(short_tmp / "policy.Ask", b"allow:personal")
    asked = _asked(short_tmp)
    decision = await _caller().ask(asked, SYSTEM)
    await trio.to_thread.run_sync(thread.join, 20)
    assert (decision.action, decision.target) == (Action.ALLOW, "personal")
    header, _, body = got[0].partition(b"\0")
    assert header == b"policy.Ask dom0 name dom0"
    assert json.loads(body) == ask_request(asked, SYSTEM)


@pytest.mark.parametrize(("body", "logged"), [
    ("sys.stdout.write('allow:vault')", "answer is not one"),
    ("sys.stdout.write('yes please')", "answer is not one"),
    ("sys.stdout.write('x' * 100000)", "could not be asked"),
    ("sys.stdout.write('allow:personal'); sys.exit(3)", "could not be asked"),
    ("time.sleep(30)", "did not answer in time"),
])
async def test_bad_or_late_answers_deny_and_say_why(tmp_path: Path, dom0_rpc: Path, body: str,
                                                     logged: str) -> None:
    _program_service(dom0_rpc, "policy.Ask", body)
    with capture_logs() as logs:
        with trio.fail_after(20):
            decision = await _caller(policy_ask=1.5).ask(_asked(tmp_path), SYSTEM)
    assert decision.action is Action.DENY
    assert any(logged in entry["event"] for entry in logs), logs


async def test_no_agent_service_or_no_agent_denies(tmp_path: Path, dom0_rpc: Path) -> None:
    asked = _asked(tmp_path)
    with capture_logs() as logs:
        missing = await _caller().ask(asked, SYSTEM)
        nobody = await _caller(None).ask(asked, SYSTEM)
    assert missing.action is Action.DENY and nobody.action is Action.DENY
    assert "not found" in logs[0]["error"]
    assert logs[1]["event"].startswith("ask denied: no policy agent")
    assert not missing.notify  # nobody could be asked: as the ask rule says (no notify=)


async def test_notifications_run_in_the_background_and_are_bounded(
        tmp_path: Path, dom0_rpc: Path) -> None:
    service = _program_service(dom0_rpc, "policy.Notify", "time.sleep(30)")
    caller = _caller(policy_notify=1.0)
    caller.max_pending = 2
    notice = failure_notice("work", "vault", "test.Svc", "")
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            caller.attach(nursery)
            with trio.fail_after(1):  # never waits for the agent
                for _ in range(3):
                    await caller.notify(notice, "work", SYSTEM)
        # The nursery waited for the two in flight, each cut at its timeout.
    events = [entry["event"] for entry in logs]
    assert events.count("notification not delivered in time") == 2
    assert events.count("notification dropped: too many in flight") == 1
    assert _recorded(service)[0] == notice


async def test_missing_notify_service_is_quiet(tmp_path: Path, dom0_rpc: Path) -> None:
    with capture_logs() as logs:
        await _caller().notify(failure_notice("work", "vault", "test.Svc", ""), "work",
                               SYSTEM)
    # At most a debug line (which a test run's logging set-up may drop).
    assert all(e["log_level"] == "debug" for e in logs), logs


async def test_a_failing_agent_never_raises(tmp_path: Path, dom0_rpc: Path) -> None:
    _program_service(dom0_rpc, "policy.Notify", "sys.exit(1)")
    request = Request("work", "vault", "test.Svc")
    denied = Decision(Action.DENY, request, notify=True)
    notice = notify_request(denied)
    assert notice is not None
    with capture_logs() as logs:
        await _caller().notify(notice, "work", SYSTEM)
    assert logs[-1]["event"] == "notification not delivered"
    assert logs[-1]["log_level"] == "warning"


async def test_facts_for_a_failure_notice_are_fetched_in_the_background(
        tmp_path: Path, dom0_rpc: Path) -> None:
    service = _program_service(dom0_rpc, "policy.Notify", "pass")
    notice = failure_notice("work", "vault", "test.Svc", "")
    fetched = trio.Event()

    async def slow_then_unavailable() -> SystemInfo:
        await trio.sleep(0.5)
        fetched.set()
        raise RuntimeError("qubesd is away")

    caller = _caller()
    async with trio.open_nursery() as nursery:
        caller.attach(nursery)
        with trio.fail_after(0.2):  # the caller goes on at once
            await caller.notify(notice, "work", facts=slow_then_unavailable)
        assert not fetched.is_set()
    # Without facts the default agent (dom0 here) is told.
    assert _recorded(service)[0] == notice
