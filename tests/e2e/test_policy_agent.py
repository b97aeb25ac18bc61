"""ask and notify as today's dom0 does them: the daemon asks the policy agent
(policy.Ask) in the source's guivm, or in the configured default domain, and
tells it (policy.Notify); ``qrexec-trio policy-agent`` asks on a terminal.

The calling VM's agent is played by the test (FakeSourceAgent); the agent's
domain and the target are real VMs with stand-in policy services that record
what dom0 sent them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

from harness import Host, program, wait_for

from .test_dom0_glue import ECHO, FakeSourceAgent, _check_call

#: The daemon tests play the calling VM's agent over the socket backend's wire.
vm1_played = pytest.mark.socket_vchan_peer

#: A policy.Ask stand-in: records its input and environment, answers what the
#: file ``answer`` beside it says (``SLEEP``: answers nothing for long).
ASK_STAND_IN = """#!/bin/sh
cat > "{rec}/ask.json"
echo "$QREXEC_SERVICE_FULL_NAME $QREXEC_REMOTE_DOMAIN $#" > "{rec}/ask.env"
answer=$(cat "{rec}/answer")
if [ "$answer" = SLEEP ]; then exec sleep 60; fi
printf '%s' "$answer"
"""
#: A policy.Notify stand-in: one line per notification.
NOTIFY_STAND_IN = """#!/bin/sh
cat >> "{rec}/notify.jsonl"
echo >> "{rec}/notify.jsonl"
"""


def _agent_vm(host: Host, name: str = "gui", domid: int = 44, answer: str = "allow:vm2"):
    """A VM whose policy.Ask and policy.Notify are stand-ins; returns (vm, record dir)."""
    record = host.root / f"rec-{name}"
    record.mkdir()
    (record / "answer").write_text(answer)
    vm = host.start_vm(name, domid)
    vm.add_service("policy.Ask", ASK_STAND_IN.format(rec=record))
    vm.add_service("policy.Notify", NOTIFY_STAND_IN.format(rec=record))
    return vm, record


def _target(host: Host):
    vm2 = host.start_vm("vm2", 43)
    vm2.add_service("test.Echo", ECHO)
    return vm2


def _system_info(host: Host, **guivms: str) -> Path:
    domains: dict[str, dict] = {"dom0": {"type": "AdminVM"}}
    for name in ("vm1", "vm2", "gui"):
        domains[name] = {"type": "AppVM"}
    for name, guivm in guivms.items():
        domains[name]["guivm"] = guivm
    path = host.root / "system-info.json"
    path.write_text(json.dumps({"domains": domains}))
    return path


def _notifications(record: Path) -> list[dict]:
    path = record / "notify.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@vm1_played
def test_ask_goes_to_the_sources_guivm_which_picks_the_target(host: Host) -> None:
    _target(host)
    _, record = _agent_vm(host)
    host.set_policy("test.Echo * vm1 @anyvm ask default_target=vm2 notify=yes\n")
    vm1 = FakeSourceAgent(host, "--system-info", str(_system_info(host, vm1="gui")),
                          "--policy-agent", "")
    vm1.trigger("@default", "test.Echo+arg")
    _check_call(vm1.call(vm1.expect_connect(), b"hi\n"), b"arg=arg src=vm1\nhi\n")
    assert json.loads((record / "ask.json").read_text()) == {
        "source": "vm1", "service": "test.Echo", "argument": "+arg",
        "targets": ["gui", "vm2"], "default_target": "vm2",
        "icons": {"dom0": "adminvm-black", "vm1": "appvm-black", "vm2": "appvm-black",
                  "gui": "appvm-black"},
    }
    # As the reference: 'DEFAULT:QUBESRPC policy.Ask dom0', no argument.
    assert (record / "ask.env").read_text() == "policy.Ask dom0 0\n"
    (answered,) = vm1.vm.daemon_events("ask answered")
    assert (answered["agent"], answered["result"], answered["target"]) == ("gui", "allow", "vm2")
    # The ask rule says notify=yes: the allow is told to the same agent.
    wait_for(lambda: _notifications(record), what="the notification")
    assert _notifications(record) == [{"resolution": "allow", "service": "test.Echo",
                                       "argument": "+arg", "source": "vm1", "target": "vm2"}]


@vm1_played
def test_without_a_guivm_the_default_agent_is_asked(host: Host) -> None:
    _target(host)
    _, record = _agent_vm(host, answer="deny")
    host.set_policy("test.Echo * vm1 vm2 ask\n")
    vm1 = FakeSourceAgent(host, "--policy-agent", "gui")
    vm1.trigger("vm2", "test.Echo")
    vm1.expect_refused()
    assert json.loads((record / "ask.json").read_text())["targets"] == ["vm2"]
    (answered,) = vm1.vm.daemon_events("ask answered")
    assert (answered["agent"], answered["result"]) == ("gui", "deny")
    # The user said no; the ask rule has no notify=yes: nobody is told.
    time.sleep(0.5)
    assert _notifications(record) == []


@vm1_played
def test_no_agent_anywhere_denies_the_ask(host: Host) -> None:
    host.set_policy("test.Echo * vm1 vm2 ask\n")
    vm1 = FakeSourceAgent(host, "--policy-agent", "")
    vm1.trigger("vm2", "test.Echo")
    vm1.expect_refused()
    wait_for(lambda: vm1.vm.daemon_events("ask denied: no policy agent for the source "
                                          "(no guivm, no default)"), what="the reason")


@vm1_played
@pytest.mark.parametrize(("answer", "problem"), [
    ("allow:nothere", "not offered"),
    ("allow:vm1", "not offered"),  # the caller itself is never offered
    ("sure", "invalid answer"),
    ("", "empty answer"),
])
def test_garbage_answers_deny(host: Host, answer: str, problem: str) -> None:
    _agent_vm(host, answer=answer)
    host.set_policy("test.Echo * vm1 @anyvm ask\n")
    vm1 = FakeSourceAgent(host, "--policy-agent", "gui")
    vm1.trigger("vm2", "test.Echo")
    vm1.expect_refused()
    (line,) = vm1.vm.daemon_events("ask denied: the policy agent's answer is not one")
    assert problem in line["problem"]


@vm1_played
def test_an_agent_that_does_not_answer_in_time_is_a_deny(host: Host,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    env = host.env
    monkeypatch.setattr(host, "env", lambda domid, **extra: env(
        domid, QREXEC_TIMEOUT_POLICY_ASK="3", **extra))
    _agent_vm(host, answer="SLEEP")
    host.set_policy("test.Echo * vm1 vm2 ask\n")
    vm1 = FakeSourceAgent(host, "--policy-agent", "gui")
    started = time.monotonic()
    vm1.trigger("vm2", "test.Echo")
    vm1.expect_refused()
    assert time.monotonic() - started >= 3
    (line,) = vm1.vm.daemon_events("ask denied: the policy agent did not answer in time")
    assert line["timeout"] == 3


@vm1_played
def test_dom0s_own_socket_service_answers(host: Host) -> None:
    _target(host)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(host.dom0_services / "policy.Ask"))
    server.listen(1)
    server.settimeout(30)
    got: list[bytes] = []

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            data = b""
            while chunk := connection.recv(4096):
                data += chunk
            got.append(data)
            connection.sendall(b"allow:vm2")

    thread = threading.Thread(target=serve)
    thread.start()
    host.set_policy("test.Echo * vm1 vm2 ask\n")
    vm1 = FakeSourceAgent(host)  # the default agent: dom0
    vm1.trigger("vm2", "test.Echo")
    port = vm1.expect_connect()
    thread.join(30)
    server.close()
    _check_call(vm1.call(port, b""), b"arg= src=vm1\n")
    descriptor, _, body = got[0].partition(b"\0")
    assert descriptor == b"policy.Ask dom0 name dom0"
    assert json.loads(body)["targets"] == ["vm2"]


@vm1_played
def test_dom0s_own_program_service_answers(host: Host) -> None:
    _target(host)
    record = host.root / "dom0-ask.json"
    service = host.dom0_services / "policy.Ask"
    service.write_text(f"#!/bin/sh\ncat > {record}\nprintf allow:vm2\n")
    service.chmod(0o755)
    host.set_policy("test.Echo * vm1 vm2 ask default_target=vm2\n")
    vm1 = FakeSourceAgent(host)
    vm1.trigger("vm2", "test.Echo")
    _check_call(vm1.call(vm1.expect_connect(), b""), b"arg= src=vm1\n")
    assert json.loads(record.read_text())["default_target"] == "vm2"


@vm1_played
def test_notify_as_the_rules_say_and_on_failure(host: Host) -> None:
    _target(host)
    _, record = _agent_vm(host)
    host.set_policy(
        "test.Quiet * vm1 vm2 deny notify=no\n"
        "test.Denied * vm1 vm2 deny\n"
        "test.Echo * vm1 vm2 allow notify=yes\n"
        "test.Silent * vm1 vm2 allow\n"
        "test.Echo * vm1 vm9 allow\n")
    vm1 = FakeSourceAgent(host, "--policy-agent", "gui")
    expected: list[dict] = []

    def told(resolution: str, service: str, target: str, argument: str = "+") -> None:
        expected.append({"resolution": resolution, "service": service, "argument": argument,
                         "source": "vm1", "target": target})
        wait_for(lambda: len(_notifications(record)) == len(expected),
                 what=f"the {resolution} notification")

    vm1.trigger("vm2", "test.Quiet", b"SOCKET1")
    vm1.expect_refused(b"SOCKET1")
    vm1.trigger("vm2", "test.Denied", b"SOCKET2")
    vm1.expect_refused(b"SOCKET2")
    told("deny", "test.Denied", "vm2")
    vm1.trigger("vm2", "test.Silent", b"SOCKET3")
    vm1.call(vm1.expect_connect(b"SOCKET3"), b"")
    vm1.trigger("vm2", "test.Echo+a", b"SOCKET4")
    vm1.call(vm1.expect_connect(b"SOCKET4"), b"")
    told("allow", "test.Echo", "vm2", "+a")
    vm1.trigger("vm9", "test.Echo", b"SOCKET5")  # allowed, but vm9 is not running
    vm1.expect_refused(b"SOCKET5")
    told("fail", "test.Echo", "vm9")
    time.sleep(0.5)  # anything else would have come by now
    assert _notifications(record) == expected
    assert len(vm1.vm.daemon_events("policy notification sent")) == 3


# --- qrexec-trio policy-agent on a terminal -----------------------------------------------


class Terminal:
    """A pseudo-terminal that a program gets as its controlling terminal."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.name = os.ttyname(self.slave)
        self.seen = b""

    def make_controlling(self) -> None:
        """preexec_fn of a child started with start_new_session=True."""
        fd = os.open(self.name, os.O_RDWR)
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
        os.close(fd)

    def read_until(self, marker: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{marker!r} not shown; the terminal has: {self.seen!r}"
            readable, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if readable:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: nobody has the terminal open yet
                        raise
                    time.sleep(0.05)
        return self.seen

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal():
    tty = Terminal()
    yield tty
    tty.close()


ASK = {"source": "vm1", "service": "test.Echo", "argument": "+arg",
       "targets": ["gui", "vm2", "@dispvm:dvm"], "default_target": "vm2",
       "icons": {"vm1": "appvm-red"}}
PROMPT = b"n to deny): "


def _agent(host: Host, terminal: Terminal | None, *args: str,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [program("qrexec-trio"), "policy-agent", *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=terminal.make_controlling if terminal else None,
        env=env or host.env(0))


def _finish(agent: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    assert agent.stdout is not None and agent.stderr is not None
    out, err = agent.stdout.read(), agent.stderr.read()
    assert agent.wait(30) == 0, err
    return out, err


@pytest.mark.parametrize(("typed", "answer"), [
    (b"1\n", b"allow:gui"),
    (b"\n", b"allow:vm2"),  # Enter: the default
    (b"@dispvm:dvm\n", b"allow:@dispvm:dvm"),
    (b"7\nvault\n3\n", b"allow:@dispvm:dvm"),  # not choices: asked again
    (b"n\n", b"deny"),
])
def test_policy_agent_asks_on_its_terminal(host: Host, terminal: Terminal, typed: bytes,
                                           answer: bytes) -> None:
    agent = _agent(host, terminal, "policy.Ask")
    assert agent.stdin is not None
    agent.stdin.write(json.dumps(ASK).encode())
    agent.stdin.close()
    shown = terminal.read_until(PROMPT)
    assert b"vm1 asks to call test.Echo+arg" in shown
    assert b"1) gui" in shown and b"2) vm2  (default)" in shown
    assert b"3) @dispvm:dvm" in shown and b"Enter for 2" in shown
    terminal.type(typed)
    assert _finish(agent)[0] == answer


def test_policy_agent_takes_its_name_from_the_service_environment(
        host: Host, terminal: Terminal) -> None:
    agent = _agent(host, terminal, env=host.env(0, QREXEC_SERVICE_FULL_NAME="policy.Ask"))
    assert agent.stdin is not None
    agent.stdin.write(json.dumps(ASK).encode())
    agent.stdin.close()
    terminal.read_until(PROMPT)
    terminal.type(b"2\n")
    assert _finish(agent)[0] == b"allow:vm2"


def test_policy_agent_without_a_terminal_denies(host: Host) -> None:
    agent = _agent(host, None, "policy.Ask")
    out, err = agent.communicate(json.dumps(ASK).encode(), timeout=30)
    assert (agent.returncode, out) == (0, b"deny")
    assert b"cannot ask on /dev/tty" in err


def test_policy_agent_denies_when_nobody_answers(host: Host, terminal: Terminal) -> None:
    agent = _agent(host, terminal, "policy.Ask",
                   env=host.env(0, QREXEC_TIMEOUT_POLICY_ASK="1"))
    out, err = agent.communicate(json.dumps(ASK).encode(), timeout=30)
    assert (agent.returncode, out) == (0, b"deny")
    assert b"no answer" in err


def test_policy_agent_gives_the_terminal_back_when_stopped(host: Host,
                                                           terminal: Terminal) -> None:
    agent = _agent(host, terminal, "policy.Ask")
    assert agent.stdin is not None
    agent.stdin.write(json.dumps(ASK).encode())
    agent.stdin.close()
    terminal.read_until(PROMPT)
    agent.send_signal(signal.SIGTERM)
    assert _finish(agent)[0] == b"deny"
    assert b"interrupted" in terminal.read_until(b"interrupted: denied")


def test_policy_agent_refuses_a_malformed_request(host: Host) -> None:
    agent = _agent(host, None, "policy.Ask")
    out, err = agent.communicate(b'{"source": "vm1"}', timeout=30)
    assert (agent.returncode, out) == (1, b"deny")
    assert b"malformed policy.Ask request" in err


def test_policy_agent_notify_writes_one_line(host: Host, terminal: Terminal) -> None:
    agent = _agent(host, terminal, "policy.Notify")
    notice = {"resolution": "deny", "service": "test.Echo", "argument": "+",
              "source": "vm1", "target": "vm\x1b2"}
    out, _ = agent.communicate(json.dumps(notice).encode(), timeout=30)
    assert (agent.returncode, out) == (0, b"")
    line = terminal.read_until(b"\n")
    assert b"[qrexec] Denied: test.Echo from vm1 to vm?2" in line  # no escape reaches it
    quiet = _agent(host, None, "policy.Notify")
    _, err = quiet.communicate(json.dumps(notice | {"resolution": "fail"}).encode(), timeout=30)
    assert quiet.returncode == 0 and b"[qrexec] Failed: test.Echo" in err


# --- a local world with its policy agent ---------------------------------------------------

WORLD = """
[vm.work]
domid = 10
[vm.work.services]
"demo.Echo" = "exec cat"

[vm.vault]
domid = 11
[vm.vault.services]
"demo.Echo" = "echo vault; exec cat"

[policy]
agent = "vault"
rules = '''
demo.Echo * work @anyvm ask default_target=vault
'''
"""


def test_a_world_asks_on_its_own_terminal(host: Host, terminal: Terminal) -> None:
    config = host.root / "world.toml"
    config.write_text(WORLD)
    directory = host.root / "w"
    with open(host.root / "world.log", "wb") as log:
        world = subprocess.Popen(
            [program("qrexec-trio"), "world", str(config), "--dir", str(directory),
             "--log-level", "debug"],
            env=host.env(0), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True, preexec_fn=terminal.make_controlling)
    try:
        wait_for(lambda: (directory / "world.json").exists() or world.poll() is not None,
                 timeout=60, what="the world")
        assert world.poll() is None, (host.root / "world.log").read_text()[-2000:]
        call = subprocess.Popen(
            [program("qrexec-trio"), "call", "--world", str(directory), "work", "@default",
             "demo.Echo"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=host.env(0))
        # The agent's services run in the background of the world's terminal: the
        # question is asked there all the same.
        shown = terminal.read_until(PROMPT, timeout=60)
        assert b"work asks to call demo.Echo" in shown and b"vault  (default)" in shown
        terminal.type(b"\n")
        out, err = call.communicate(b"hi\n", timeout=60)
        assert (call.returncode, out) == (0, b"vault\nhi\n"), err
        # The world has its terminal back: Ctrl-C stops it, as before.
        wait_for(lambda: os.tcgetpgrp(terminal.master) == world.pid,
                 what="the world to be in the foreground again")
        terminal.type(b"\x03")
        assert world.wait(60) == 0, (host.root / "world.log").read_text()[-2000:]
    finally:
        if world.poll() is None:
            world.kill()
            world.wait()
    assert not directory.exists()
