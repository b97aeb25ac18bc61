"""VM-initiated calls, dom0 side: the daemon, its policy and the glued pipeline.

The calling VM's agent is played by the test (it sends the trigger and plays
qrexec-client-vm's data vchan), so that every byte dom0 sends to it can be
checked; the target VMs are real agents with their daemons.
"""

from __future__ import annotations

import socket
import struct

import psutil
import pytest

from harness import VM, Host, is_program, marked_processes, program, wait_for
from vectors import Peer, connect_unix, listen_unix

pytestmark = pytest.mark.socket_vchan_peer

HELLO = 0x300
DATA_STDIN, DATA_STDOUT, DATA_STDERR, DATA_EXIT_CODE = 0x190, 0x191, 0x192, 0x193
SERVICE_CONNECT, SERVICE_REFUSED = 0x202, 0x203
CONNECTION_TERMINATED, TRIGGER_SERVICE4 = 0x211, 0x213
ECHO = '#!/bin/sh\necho "arg=$1 src=$QREXEC_REMOTE_DOMAIN"\nexec cat\n'


def trigger_payload(target: bytes, service: bytes, ident: bytes, source: bytes = b"") -> bytes:
    return struct.pack("<64s64s32s", source, target, ident) + service + b"\0"


class FakeSourceAgent:
    """vm1's agent, played by the test, with vm1's real daemon."""

    def __init__(self, host: Host, *daemon_args: str, name: str = "vm1", domid: int = 42):
        self.host = host
        self.domid = domid
        self.vm, control = host.start_daemon_for_fake_agent(name, domid, None, *daemon_args)
        self.control = Peer(control)
        self.control.send(HELLO, struct.pack("<I", 4))
        assert self.control.receive() == (HELLO, struct.pack("<I", 4))

    def trigger(self, target: str, service: str, ident: bytes = b"SOCKET13") -> None:
        self.control.send(TRIGGER_SERVICE4,
                          trigger_payload(target.encode(), service.encode(), ident))

    def expect_connect(self, ident: bytes = b"SOCKET13", domain: int = 0) -> int:
        """The daemon's MSG_SERVICE_CONNECT: serve the data vchan towards ``domain``."""
        answer = self.control.receive()
        assert answer is not None, "the daemon closed the control link"
        assert answer[0] == SERVICE_CONNECT, f"expected SERVICE_CONNECT, got {answer}"
        got_domain, port = struct.unpack("<II", answer[1][:8])
        assert got_domain == domain and answer[1][8:] == ident.ljust(32, b"\0")
        return port

    def expect_refused(self, ident: bytes = b"SOCKET13") -> None:
        assert self.control.receive() == (SERVICE_REFUSED, ident.ljust(32, b"\0"))

    def offer_data_vchan(self, port: int, peer: int = 0) -> socket.socket:
        """client-vm's part: the data vchan server, towards dom0 (or the ``peer`` VM)."""
        return listen_unix(self.host.vchan_dir / f"vchan.{self.domid}.{peer}.{port}.sock")

    def call(self, port: int, stdin: bytes, peer: int = 0) -> list[tuple[int, bytes]]:
        """Play client-vm through a whole call; returns what its peer sent."""
        listener = self.offer_data_vchan(port, peer)
        data = Peer(listener.accept()[0])
        listener.close()
        data.send(HELLO, struct.pack("<I", 4))
        if stdin:
            data.send(DATA_STDIN, stdin)
        data.send(DATA_STDIN, b"")
        got = receive_until_exit_code(data)
        data.close()
        self.control.send(CONNECTION_TERMINATED, struct.pack("<II", peer, port))
        return got


def receive_until_exit_code(data: Peer) -> list[tuple[int, bytes]]:
    """What the service side sends on a data vchan, up to its exit code (or EOF)."""
    got = []
    while (message := data.receive()) is not None:
        got.append(message)
        if message[0] == DATA_EXIT_CODE:
            break
    return got


def _stream(got: list[tuple[int, bytes]], msg_type: int) -> bytes:
    return b"".join(p for t, p in got if t == msg_type)


def _check_call(got: list[tuple[int, bytes]], stdout: bytes, status: int = 0) -> None:
    assert got[0] == (HELLO, struct.pack("<I", 4))
    assert _stream(got, DATA_STDOUT) == stdout
    assert (DATA_STDOUT, b"") in got and (DATA_STDERR, b"") in got
    assert got[-1] == (DATA_EXIT_CODE, struct.pack("<i", status))


def _vm2(host: Host) -> VM:
    vm2 = host.start_vm("vm2", 43)
    vm2.add_service("test.Echo", ECHO)
    return vm2


def test_vm_to_vm_call_is_glued_through_dom0(host: Host) -> None:
    vm2 = _vm2(host)
    host.set_policy("test.Echo * vm1 vm2 allow\n")
    vm1 = FakeSourceAgent(host)
    vm1.trigger("vm2", "test.Echo+arg")
    port = vm1.expect_connect()
    got = vm1.call(port, b"to-vm2\n")
    _check_call(got, b"arg=arg src=vm1\nto-vm2\n")
    # Both legs' ports come back: vm1's daemon (source leg), vm2's daemon (target leg).
    wait_for(lambda: vm1.vm.daemon_events("port released"), what="the source leg's port")
    wait_for(lambda: vm2.daemon_events("port released"), what="the target leg's port")
    # The target VM got the call as a normal service request from dom0.
    (running,) = vm2.agent_events("running")
    assert running["what"] == "test.Echo+arg" and running["domain"] == 0


def test_vm_to_dom0_call_runs_the_dom0_service(host: Host) -> None:
    (host.dom0_services / "test.Echo").write_text(ECHO)
    (host.dom0_services / "test.Echo").chmod(0o755)
    host.set_policy("test.Echo * vm1 dom0 allow\n")
    vm1 = FakeSourceAgent(host)
    vm1.trigger("dom0", "test.Echo+arg")
    got = vm1.call(vm1.expect_connect(), b"to-dom0\n")
    _check_call(got, b"arg=arg src=vm1\nto-dom0\n")


def test_vm_to_dom0_missing_service_is_127(host: Host) -> None:
    host.set_policy("test.Missing * vm1 dom0 allow\n")
    vm1 = FakeSourceAgent(host)
    vm1.trigger("dom0", "test.Missing")
    got = vm1.call(vm1.expect_connect(), b"")
    assert got[-1] == (DATA_EXIT_CODE, struct.pack("<i", 127))


def test_deny_and_no_policy_refuse(host: Host) -> None:
    vm1 = FakeSourceAgent(host)
    vm1.trigger("vm2", "test.Echo")  # no policy at all: deny
    vm1.expect_refused()
    host.set_policy("test.Echo * vm1 vm2 deny\n")
    vm1.trigger("vm2", "test.Echo", ident=b"SOCKET14")
    vm1.expect_refused(b"SOCKET14")
    wait_for(lambda: len(vm1.vm.daemon_events("request denied")) == 2, what="two denials")


def test_target_redirect_and_argument_routing(host: Host) -> None:
    vm2 = _vm2(host)
    vm2.add_service("test.Which", "#!/bin/sh\necho generic $1\n")
    vm2.add_service("test.Which+special", "#!/bin/sh\necho specific $1\n")
    host.set_policy("test.Which * vm1 @default allow target=vm2\n")
    vm1 = FakeSourceAgent(host)
    vm1.trigger("@default", "test.Which+special")
    _check_call(vm1.call(vm1.expect_connect(), b""), b"specific special\n")
    vm1.trigger("@default", "test.Which+other", ident=b"SOCKET14")
    _check_call(vm1.call(vm1.expect_connect(b"SOCKET14"), b""), b"generic other\n")


def test_target_that_is_not_running_is_refused(host: Host) -> None:
    host.set_policy("test.Echo * vm1 vm9 allow\n")
    vm1 = FakeSourceAgent(host)
    vm1.trigger("vm9", "test.Echo")
    vm1.expect_refused()
    wait_for(lambda: any("not running" in str(e) for e in vm1.vm.daemon_events("call failed")),
             what="a log line saying why")


def test_bad_triggers_are_refused_with_a_reason(host: Host) -> None:
    vm1 = FakeSourceAgent(host)
    cases = [
        (b"vm2", b"test/Svc", "outside"),
        (b"vm2", b"test$Svc", "outside"),
        (b"vm2", b"+arg", "starts with '+'"),
        (b"vm$2", b"test.Svc", "outside"),
    ]
    for number, (target, service, _) in enumerate(cases):
        ident = f"SOCKET{number}".encode()
        vm1.control.send(TRIGGER_SERVICE4, trigger_payload(target, service, ident))
        vm1.expect_refused(ident)
    # A NUL inside the service name: the name field ends early, the rest is not NUL.
    vm1.control.send(TRIGGER_SERVICE4, struct.pack("<64s64s32s", b"", b"vm2", b"SOCKET9")
                     + b"test\0Svc\0")
    vm1.expect_refused(b"SOCKET9")
    refusals = vm1.vm.daemon_events("invalid service request refused")
    assert len(refusals) == 5
    assert all("trigger." in e["error"] for e in refusals)


def test_flood_of_triggers_is_refused_above_the_limit_and_others_are_served(host: Host) -> None:
    vm2 = _vm2(host)
    vm2.add_service("test.Slow", "#!/bin/sh\nsleep 0.5; echo done\n")
    host.set_policy("test.Slow * vm1 vm2 allow\ntest.Echo * @anyvm vm2 allow\n")
    vm1 = FakeSourceAgent(host, "--max-calls", "3")
    idents = [f"SOCKET{i}".encode() for i in range(40)]
    for ident in idents:
        vm1.trigger("vm2", "test.Slow", ident)
    answers = [vm1.control.receive() for _ in idents]
    connected = [a for a in answers if a is not None and a[0] == SERVICE_CONNECT]
    refused = [a for a in answers if a is not None and a[0] == SERVICE_REFUSED]
    assert len(connected) == 3 and len(refused) == 37
    # The first three finish normally.
    for answer in connected:
        port = struct.unpack("<II", answer[1][:8])[1]
        assert _stream(vm1.call(port, b""), DATA_STDOUT) == b"done\n"
    # Another VM's calls are unaffected, and so is a plain dom0 -> vm2 call.
    assert vm2.client(f"{vm2.user}:echo fine").stdout == b"fine\n"


def _sleeping_call(host: Host) -> tuple[VM, FakeSourceAgent, int, Peer]:
    """vm1 calls a service in vm2 that says "started" and then sleeps."""
    vm2 = _vm2(host)
    vm2.add_service("test.Sleep", "#!/bin/sh\necho started\nexec sleep 1000\n")
    host.set_policy("test.Sleep * vm1 vm2 allow\ntest.Echo * vm1 vm2 allow\n")
    vm1 = FakeSourceAgent(host)
    vm1.trigger("vm2", "test.Sleep")
    port = vm1.expect_connect()
    listener = vm1.offer_data_vchan(port)
    data = Peer(listener.accept()[0])
    listener.close()
    data.send(HELLO, struct.pack("<I", 4))
    assert data.receive() == (HELLO, struct.pack("<I", 4))
    assert data.receive() == (DATA_STDOUT, b"started\n")
    return vm2, vm1, port, data


def test_caller_gone_mid_stream_ends_the_target_service_and_frees_both_ports(
    host: Host,
) -> None:
    vm2, vm1, port, data = _sleeping_call(host)
    sleepers = [p for p in marked_processes(host.mark) if is_program(p, "sleep")]
    assert len(sleepers) == 1
    data.close()  # the caller is gone
    vm1.control.send(CONNECTION_TERMINATED, struct.pack("<II", 0, port))
    wait_for(lambda: not _alive(sleepers[0]), what="the target service to be killed")
    wait_for(lambda: vm2.daemon_events("port released"), what="the target leg's port")
    wait_for(lambda: vm1.vm.daemon_events("port released"), what="the source leg's port")


def test_target_agent_killed_mid_stream_ends_the_call_and_daemons_keep_serving(
    host: Host,
) -> None:
    vm2, vm1, port, data = _sleeping_call(host)
    vm2.kill_agent()
    # dom0 closes the source leg: the caller sees the end without an exit code.
    rest = []
    while (message := data.receive()) is not None:
        rest.append(message)
    assert all(t != DATA_EXIT_CODE for t, _ in rest)
    data.close()
    vm1.control.send(CONNECTION_TERMINATED, struct.pack("<II", 0, port))
    vm2.start_agent()
    wait_for(lambda: vm2.client(f"{vm2.user}:echo back", timeout=30).stdout == b"back\n",
             timeout=30, interval=0.2, what="vm2 to be served again")
    vm1.trigger("vm2", "test.Echo", ident=b"SOCKET14")
    _check_call(vm1.call(vm1.expect_connect(b"SOCKET14"), b"x"), b"arg= src=vm1\nx")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_service_connect_for_an_unknown_request_is_ignored(host: Host) -> None:
    vm1 = FakeSourceAgent(host)
    client = Peer(connect_unix(host.socket_dir / "qrexec.42"))
    assert client.receive() == (HELLO, struct.pack("<I", 3))
    client.send(HELLO, struct.pack("<I", 3))
    client.send(SERVICE_CONNECT, struct.pack("<II", 0, 0) + b"NEVER-ASKED".ljust(32, b"\0"))
    client.expect_eof()
    wait_for(lambda: vm1.vm.daemon_events("SERVICE_CONNECT for a request that is not pending"),
             what="the daemon to log the unknown request")


def _policy_exec_wrapper(host: Host, body: str) -> str:
    path = host.root / "policy-exec"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_r2_mode_qrexec_policy_makes_the_connection(host: Host) -> None:
    vm2 = _vm2(host)
    host.set_policy("test.Echo * vm1 vm2 allow\n")
    wrapper = _policy_exec_wrapper(
        host, f'exec {program("qrexec-policy")} --policy-d {host.policy_d} --policy-dir '
        f'{host.root}/none --socket-dir {host.socket_dir} "$@"')
    vm1 = FakeSourceAgent(host, "--policy-exec", wrapper)
    vm1.trigger("vm2", "test.Echo+r2")
    got = vm1.call(vm1.expect_connect(), b"hello\n")
    _check_call(got, b"arg=r2 src=vm1\nhello\n")
    wait_for(lambda: vm1.vm.daemon_events("policy program finished"),
             what="the policy program to finish")
    assert vm2.agent_events("finished")


def test_r2_mode_deny_refuses(host: Host) -> None:
    wrapper = _policy_exec_wrapper(
        host, f'exec {program("qrexec-policy")} --policy-d {host.policy_d} --policy-dir '
        f'{host.root}/none --socket-dir {host.socket_dir} "$@"')
    vm1 = FakeSourceAgent(host, "--policy-exec", wrapper)
    vm1.trigger("vm2", "test.Echo")
    vm1.expect_refused()


def test_qrexec_client_c_answers_a_pending_request(host: Host) -> None:
    """A policy program that never answers leaves the request to qrexec-client -c."""
    import subprocess

    vm2 = _vm2(host)
    wrapper = _policy_exec_wrapper(host, "exec sleep 60")
    vm1 = FakeSourceAgent(host, "--policy-exec", wrapper)
    vm1.trigger("vm2", "test.Echo+c", ident=b"REQ1")
    wait_for(lambda: [p for p in marked_processes(host.mark) if is_program(p, "sleep")],
             what="the request to be pending")
    client = subprocess.Popen(
        [program("qrexec-client"), "--socket-dir", str(host.socket_dir), "-d", "vm2",
         "-c", "REQ1,vm1,42", f"{vm2.user}:QUBESRPC test.Echo+c vm1"],
        env=host.env(0), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # As the reference: vm2's agent connects straight to vm1 (no glue in dom0).
    got = vm1.call(vm1.expect_connect(b"REQ1", domain=43), b"via -c\n", peer=43)
    _check_call(got, b"arg=c src=vm1\nvia -c\n")
    _, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
