"""qrexec-policy-daemon and qrexec-policy-exec, run as processes.

The policy daemon is asked exactly as the reference C qrexec-daemon asks it
(wire-protocol.md §9) and must answer byte for byte as the reference's policy
daemon; qrexec-policy-exec is run in the reference's two forms, the five-argument
one by our own qrexec-daemon for a VM's request.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import Host, program, read_log, wait_for

from .test_dom0_glue import ECHO, FakeSourceAgent, _check_call, _vm2

C_REQUEST = (b"source=vm1\nrequested_source=\nintended_target=%s\n"
             b"service_and_arg=%s\n\n")
POLICY = """\
test.Echo * vm1 vm2 allow
test.Echo * vm1 @default allow target=vm2
test.Echo * vm1 dom0 allow
test.NoStart * vm1 vm2 allow autostart=no
test.Ask * vm1 vm2 ask default_target=vm2
test.Deny * @anyvm @anyvm deny
"""
ALLOW_VM2 = b"user=DEFAULT\nresult=allow\ntarget=vm2\nautostart=True\nrequested_target=vm2"
#: The client request timeout the daemon runs with here (seconds).
REQUEST_TIMEOUT = 3


def write_system_info(host: Host, **tags: list[str]) -> Path:
    """The domains the policy knows: dom0, vm1, vm2, vm3 and gui (tags by name)."""
    path = host.root / "system-info.json"
    domains: dict[str, dict] = {"dom0": {"type": "AdminVM"}}
    for name in ("vm1", "vm2", "vm3", "gui"):
        domains[name] = {"type": "AppVM", "tags": tags.get(name, [])}
    path.write_text(json.dumps({"domains": domains}))
    return path


def c_request(target: str, service: str) -> bytes:
    return C_REQUEST % (target.encode(), service.encode())


@dataclass
class PolicyDaemon:
    host: Host
    proc: subprocess.Popen[bytes]
    socket: Path
    eval_socket: Path
    gui_socket: Path
    log: Path
    notify: socket.socket

    def connect(self, path: Path | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(path or self.socket))
        return sock

    def ask(self, data: bytes, *, path: Path | None = None, shut: bool = False) -> bytes:
        """Send ``data`` as the C daemon does (no shutdown unless ``shut``), read to EOF."""
        with self.connect(path) as sock:
            try:
                sock.sendall(data)
                if shut:
                    sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed on us while we sent: what was answered is still readable
            return read_to_eof(sock)

    def events(self, event: str | None = None) -> list[dict]:
        return [e for e in read_log(self.log) if event is None or e.get("event") == event]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the daemon sent until it closed.

    A unix socket closed with bytes it did not read (a client that sent too
    much, or garbage past the point of refusal) ends with ECONNRESET for its
    peer instead of EOF, after what was sent: the same end for this purpose.
    """
    chunks = []
    try:
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def start_policy_daemon(host: Host, *extra: str, system_info: bool = True) -> PolicyDaemon:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = host.root / "notify.sock"
    notify_path.unlink(missing_ok=True)  # a previous daemon's, in the same test
    notify.bind(str(notify_path))
    notify.settimeout(30)
    paths = [host.root / name for name in ("policy.sock", "eval.sock", "gui.sock")]
    log = host.root / "policy-daemon.log"
    if system_info and "--system-info" not in extra:
        extra = ("--system-info", str(write_system_info(host)), *extra)
    env = host.env(0, NOTIFY_SOCKET=str(notify_path),
                   QREXEC_TIMEOUT_CLIENT_REQUEST=str(REQUEST_TIMEOUT))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [program("qrexec-policy-daemon"), "--socket-path", str(paths[0]),
             "--eval-socket-path", str(paths[1]), "--gui-socket-path", str(paths[2]),
             "--policy-path", str(host.policy_d), "--policy-dir", str(host.root / "none"),
             "--log-format", "json", *extra],
            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    daemon = PolicyDaemon(host, proc, *paths, log, notify)
    try:
        assert notify.recv(256) == b"READY=1"
    except TimeoutError:
        proc.kill()
        proc.wait()
        raise AssertionError(log.read_text()) from None
    return daemon


@pytest.fixture
def policy_daemon(host: Host) -> Iterator[PolicyDaemon]:
    host.set_policy(POLICY)
    daemon = start_policy_daemon(host)
    try:
        yield daemon
    finally:
        status = daemon.stop()
        daemon.notify.close()
        assert status == 0, daemon.log.read_text()[-3000:]


def test_ready_after_listening_and_a_clean_stop(host: Host) -> None:
    daemon = start_policy_daemon(host)
    assert all(path.is_socket() for path in (daemon.socket, daemon.eval_socket,
                                             daemon.gui_socket))
    assert oct(daemon.socket.stat().st_mode & 0o777) == oct(0o660)
    assert daemon.stop() == 0
    daemon.notify.close()
    assert not any(path.exists() for path in (daemon.socket, daemon.eval_socket,
                                              daemon.gui_socket))
    (ready,) = daemon.events("policy daemon ready")
    assert ready["sockets"] == [str(daemon.socket), str(daemon.eval_socket),
                                str(daemon.gui_socket)]


def test_answers_byte_for_byte_as_the_reference(policy_daemon: PolicyDaemon) -> None:
    ask = policy_daemon.ask
    assert ask(c_request("vm2", "test.Echo+arg")) == ALLOW_VM2
    assert ask(c_request("@default", "test.Echo")) == (
        b"user=DEFAULT\nresult=allow\ntarget=vm2\nautostart=True\nrequested_target=@default")
    assert ask(c_request("dom0", "test.Echo+x")) == (
        b"user=DEFAULT\nresult=allow\ntarget=dom0\nautostart=True\nrequested_target=dom0")
    assert ask(c_request("vm2", "test.NoStart")) == (
        b"user=DEFAULT\nresult=allow\ntarget=vm2\nautostart=False\nrequested_target=vm2")
    assert ask(c_request("vm2", "test.Deny")) == b"result=deny"
    assert ask(c_request("vm2", "test.Unknown")) == b"result=deny"
    # Without requested_source (older daemons' order) and ended by EOF, not an empty line.
    assert ask(b"source=vm1\nintended_target=vm2\nservice_and_arg=test.Echo", shut=True) == (
        ALLOW_VM2)
    # Every decision is logged once, with the daemon's fields.
    decisions = policy_daemon.events("policy decision")
    assert len(decisions) == 7
    assert {"source", "service", "target", "result", "reason", "rule"} <= decisions[0].keys()
    assert decisions[0]["result"] == "allow" and decisions[0]["service"] == "test.Echo+arg"


def test_ask_just_evaluate_and_assume_yes(host: Host) -> None:
    host.set_policy(POLICY)
    asked = host.root / "asked"
    prompt = host.root / "ask.sh"
    prompt.write_text(f"#!/bin/sh\ncat >/dev/null\necho asked >> {asked}\necho vm2\n")
    prompt.chmod(0o755)
    daemon = start_policy_daemon(host, "--ask-program", str(prompt))
    try:
        base = c_request("vm2", "test.Ask")[:-1]
        assert daemon.ask(base + b"\n") == ALLOW_VM2  # the ask program chose vm2
        assert asked.read_text() == "asked\n"
        assert daemon.ask(base + b"just_evaluate=yes\n\n") == b"result=deny"
        assert daemon.ask(base + b"just_evaluate=yes\nassume_yes_for_ask=yes\n\n") == (
            b"result=allow")
        assert daemon.ask(base + b"assume_yes_for_ask=yes\njust_evaluate=no\n\n") == ALLOW_VM2
        allow = c_request("vm2", "test.Echo")[:-1]
        assert daemon.ask(allow + b"just_evaluate=yes\n\n") == b"result=allow"
        deny = c_request("vm2", "test.Deny")[:-1]
        assert daemon.ask(deny + b"just_evaluate=yes\n\n") == b"result=deny"
        # Only the first request prompted.
        assert asked.read_text() == "asked\n"
    finally:
        assert daemon.stop() == 0
        daemon.notify.close()


def test_bad_clients_are_closed_with_a_log_line_and_others_served(
    policy_daemon: PolicyDaemon,
) -> None:
    silent = policy_daemon.connect()
    half = policy_daemon.connect()
    half.sendall(b"source=vm1\nintended_target=vm2\n")  # and then nothing
    started = time.monotonic()
    cases = [
        b"hello\n\n",
        b"domain_id=42\n" + c_request("vm2", "test.Echo"),
        c_request("vm2", "test.Echo").replace(b"source=vm1\n", b"source=vm1\nsource=vm1\n"),
        b"source=vm1\nintended_target=vm2\n\n",
        b"source=vm1\njust_evaluate=perhaps\n",
        b"source=\xff\n",
        b"x" * 70000,
        b"source=" + b"a" * 70000 + b"\n\n",
    ]
    for data in cases:
        assert policy_daemon.ask(data) == b"", data[:40]
    # The silent clients are still open, and a good request is answered meanwhile.
    assert policy_daemon.ask(c_request("vm2", "test.Echo")) == ALLOW_VM2
    assert time.monotonic() - started < REQUEST_TIMEOUT
    # Then the silent ones are closed at the request timeout.
    assert read_to_eof(silent) == b"" and read_to_eof(half) == b""
    assert time.monotonic() - started >= REQUEST_TIMEOUT - 0.1
    silent.close()
    half.close()
    errors = [e["error"] for e in policy_daemon.events("bad policy request; closing")]
    assert len(errors) == len(cases)
    assert errors[:6] == [
        "line without '=': 'hello'", "unknown key 'domain_id'", "duplicate key 'source'",
        "missing service_and_arg", "just_evaluate must be yes or no, not 'perhaps'",
        "request is not ASCII"]
    assert errors[6:] == ["request longer than 65536 bytes"] * 2
    assert len(policy_daemon.events("policy request not received in time; closing")) == 2
    assert policy_daemon.ask(c_request("vm2", "test.Echo")) == ALLOW_VM2


def test_one_decision_per_connection(policy_daemon: PolicyDaemon) -> None:
    both = c_request("vm2", "test.Deny") + c_request("vm2", "test.Echo")
    assert policy_daemon.ask(both) == b"result=deny"
    assert len(policy_daemon.events("policy decision")) == 1


def test_many_clients_at_once(policy_daemon: PolicyDaemon) -> None:
    socks = [policy_daemon.connect() for _ in range(50)]
    for sock in socks:
        sock.sendall(c_request("vm2", "test.Echo"))
    assert [read_to_eof(sock) for sock in socks] == [ALLOW_VM2] * 50
    for sock in socks:
        sock.close()


def test_eval_simple_and_eval_gui(host: Host) -> None:
    host.set_policy(POLICY)
    info = write_system_info(host, vm1=["guivm-gui"], vm2=["guivm-gui"])
    daemon = start_policy_daemon(host, "--system-info", str(info))
    try:
        def query(path: Path, name: str, caller: str, payload: bytes) -> bytes:
            call = f"{name}+test.Echo {caller} keyword adminvm".encode() + b"\0" + payload
            return daemon.ask(call, path=path, shut=True)

        simple, gui = daemon.eval_socket, daemon.gui_socket
        assert query(simple, "policy.EvalSimple", "vm3", b"vm1\0vm2") == b"result=allow\n"
        assert query(simple, "policy.EvalSimple", "vm3", b"vm2\0vm1") == b"result=deny\n"
        assert query(gui, "policy.EvalGUI", "gui", b"vm1\0vm2") == b"result=allow\n"
        assert query(gui, "policy.EvalGUI", "gui", b"vm2\0vm1") == b"result=deny\n"
        # Not the GuiVM of both qubes, or the wrong service: no answer at all.
        assert query(gui, "policy.EvalGUI", "vm3", b"vm1\0vm2") == b""
        assert query(gui, "policy.EvalGUI", "gui", b"vm1\0vm3") == b""
        assert query(simple, "policy.EvalGUI", "gui", b"vm1\0vm2") == b""
        assert query(simple, "policy.EvalSimple", "vm3", b"vm1") == b""
        assert daemon.ask(b"x" * 70000, path=simple) == b""
        # The main socket is unaffected.
        assert daemon.ask(c_request("vm2", "test.Echo")) == ALLOW_VM2
        assert len(daemon.events("bad policy query; closing")) == 3
    finally:
        assert daemon.stop() == 0
        daemon.notify.close()


def test_domains_facts_from_qubesd_or_only_the_request(host: Host) -> None:
    host.set_policy(POLICY)
    # No qubesd answering: every call is denied (fail closed), and logged.
    daemon = start_policy_daemon(host, "--qubesd-internal-socket", str(host.root / "nobody"),
                                 system_info=False)
    try:
        assert daemon.ask(c_request("vm2", "test.Echo")) == b"result=deny"
        (unavailable,) = daemon.events("system info unavailable")
        assert unavailable["socket"] == str(host.root / "nobody")
    finally:
        assert daemon.stop() == 0
        daemon.notify.close()
    # '': the request's names only (a test rig's choice).
    daemon = start_policy_daemon(host, "--qubesd-internal-socket", "", system_info=False)
    try:
        assert daemon.ask(c_request("vm2", "test.Echo")) == ALLOW_VM2
    finally:
        assert daemon.stop() == 0
        daemon.notify.close()


def test_the_umbrella_runs_it(host: Host) -> None:
    done = subprocess.run([program("qrexec-trio"), "policy-daemon", "--help"],
                          capture_output=True, text=True, timeout=30, env=host.env(0))
    assert done.returncode == 0 and "--socket-path" in done.stdout


# --- qrexec-policy-exec -------------------------------------------------------------


def policy_exec(host: Host, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program("qrexec-policy-exec"), "--path", str(host.policy_d), "--policy-dir",
         str(host.root / "none"), "--system-info", str(write_system_info(host)), *args],
        capture_output=True, text=True, timeout=timeout, env=host.env(0))


def test_policy_exec_three_arguments_prints_the_decision(host: Host) -> None:
    host.set_policy(POLICY)
    allowed = policy_exec(host, "--", "vm1", "vm2", "test.Echo+arg")
    assert (allowed.returncode, allowed.stdout) == (0, ALLOW_VM2.decode() + "\n")
    assert "policy decision" in allowed.stderr
    default = policy_exec(host, "vm1", "", "test.Echo")
    assert default.returncode == 0 and "requested_target=@default\n" in default.stdout
    denied = policy_exec(host, "vm1", "vm2", "test.Deny")
    assert (denied.returncode, denied.stdout) == (1, "result=deny\n")
    ask = policy_exec(host, "vm1", "vm2", "test.Ask")
    assert (ask.returncode, ask.stdout) == (1, "result=deny\n")
    yes = policy_exec(host, "--assume-yes-for-ask", "vm1", "vm2", "test.Ask")
    assert (yes.returncode, yes.stdout) == (0, ALLOW_VM2.decode() + "\n")
    for args, status in [(("vm1", "vm2", "test.Echo"), 0), (("vm1", "vm2", "test.Ask"), 1),
                         (("--assume-yes-for-ask", "vm1", "vm2", "test.Ask"), 0),
                         (("vm1", "vm2", "test.Deny"), 1),
                         (("42", "vm1", "vm2", "test.Deny", "SOCKET7"), 1),
                         (("42", "vm1", "vm2", "test.Echo", "SOCKET7"), 0)]:
        just = policy_exec(host, "--just-evaluate", *args)
        assert (just.returncode, just.stdout) == (status, ""), args
    for args in [("vm1", "vm2"), ("a", "b", "c", "d"), ("x", "vm1", "vm2", "test.Echo", "ID")]:
        usage = policy_exec(host, *args)
        assert usage.returncode == 2 and usage.stdout == "", args


def _wrapper(host: Host, name: str, body: str) -> str:
    path = host.root / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def _policy_exec_command(host: Host) -> str:
    return (f"{program('qrexec-policy-exec')} --path {host.policy_d} --policy-dir "
            f"{host.root}/none --system-info {write_system_info(host)} "
            f"--socket-dir {host.socket_dir} --qubesd-socket ''")


@pytest.mark.socket_vchan_peer
def test_our_daemon_decides_with_it_as_the_evaluator(host: Host) -> None:
    """``qrexec-daemon -p``: the reference's fallback form, PROGRAM -- SOURCE TARGET SERVICE."""
    vm2 = _vm2(host)
    host.set_policy(POLICY)
    wrapper = _wrapper(host, "evaluate", f'exec {_policy_exec_command(host)} "$@"')
    vm1 = FakeSourceAgent(host, "-p", wrapper)
    vm1.trigger("vm2", "test.Echo+p")
    _check_call(vm1.call(vm1.expect_connect(), b"hi\n"), b"arg=p src=vm1\nhi\n")
    vm1.trigger("vm2", "test.Deny", ident=b"SOCKET14")
    vm1.expect_refused(b"SOCKET14")
    assert vm2.agent_events("finished")


def _five_argument_agent(host: Host) -> FakeSourceAgent:
    # Our daemon runs "PROGRAM -- SOURCE TARGET SERVICE IDENT"; the C daemon passes
    # its domid first: the wrapper puts vm1's (42) there.
    wrapper = _wrapper(host, "connect", f'shift\nexec {_policy_exec_command(host)} -- 42 "$@"')
    return FakeSourceAgent(host, "--policy-exec", wrapper)


@pytest.mark.socket_vchan_peer
def test_five_arguments_connect_the_call_to_a_vm(host: Host) -> None:
    vm2 = _vm2(host)
    host.set_policy(POLICY)
    vm1 = _five_argument_agent(host)
    vm1.trigger("@default", "test.Echo+five")
    # As the reference's qrexec-client -c: vm2's agent connects straight to vm1.
    got = vm1.call(vm1.expect_connect(domain=43), b"via policy-exec\n", peer=43)
    _check_call(got, b"arg=five src=vm1\nvia policy-exec\n")
    wait_for(lambda: vm1.vm.daemon_events("policy program finished"),
             what="qrexec-policy-exec to finish")
    (finished,) = vm1.vm.daemon_events("policy program finished")
    assert finished["status"] == 0
    assert vm2.agent_events("finished")


@pytest.mark.socket_vchan_peer
def test_five_arguments_connect_the_call_to_dom0(host: Host) -> None:
    (host.dom0_services / "test.Echo").write_text(ECHO)
    (host.dom0_services / "test.Echo").chmod(0o755)
    host.set_policy(POLICY)
    vm1 = _five_argument_agent(host)
    vm1.trigger("dom0", "test.Echo+d0")
    _check_call(vm1.call(vm1.expect_connect(), b"to-dom0\n"), b"arg=d0 src=vm1\nto-dom0\n")
    wait_for(lambda: vm1.vm.daemon_events("policy program finished"),
             what="qrexec-policy-exec to finish")


@pytest.mark.socket_vchan_peer
def test_five_arguments_deny_refuses(host: Host) -> None:
    host.set_policy(POLICY)
    vm1 = _five_argument_agent(host)
    vm1.trigger("vm2", "test.Deny")
    vm1.expect_refused()
    (failed,) = wait_for(lambda: vm1.vm.daemon_events("policy program did not answer"),
                         what="the refusal")
    assert failed["status"] == 1

