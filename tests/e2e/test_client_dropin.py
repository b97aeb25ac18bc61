"""qrexec-client as a drop-in for today's dom0 (issue 11, item 2 and 3).

The calling VM's agent is played by the test where the bytes dom0 sends it
matter (``FakeSourceAgent``); everything else is the real programs: the
daemons, the target agents and ``qrexec-client`` itself.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import VM, Host, is_program, marked_processes, program, wait_for
from vectors import Peer, listen_unix, load, stream_bytes

from .test_dom0_glue import (
    DATA_EXIT_CODE,
    DATA_STDERR,
    DATA_STDOUT,
    ECHO,
    HELLO,
    FakeSourceAgent,
    _check_call,
    _policy_exec_wrapper,
    _stream,
    receive_until_exit_code,
)

pytestmark = pytest.mark.socket_vchan_peer


def _pending(host: Host, service: str = "test.Echo+c", target: str = "dom0",
             ident: bytes = b"REQ1") -> FakeSourceAgent:
    """vm1 with a request pending at its daemon (a policy program that never answers)."""
    vm1 = FakeSourceAgent(host, "--policy-exec", _policy_exec_wrapper(host, "exec sleep 60"))
    vm1.trigger(target, service, ident=ident)
    wait_for(lambda: [p for p in marked_processes(host.mark) if is_program(p, "sleep")],
             what="the request to be pending")
    return vm1


def _client(host: Host, *args: str, **popen) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [program("qrexec-client"), "--socket-dir", str(host.socket_dir), *args],
        env=host.env(0, QREXEC_SERVICE_PATH=str(host.dom0_services)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _dom0_service(host: Host, name: str, script: str) -> None:
    path = host.dom0_services / name
    path.write_text(script)
    path.chmod(0o755)


def test_c_to_dom0_with_a_plain_command_runs_it_with_bash(host: Host) -> None:
    vm1 = _pending(host)
    client = _client(host, "-d", "dom0", "-c", "REQ1,vm1,42",
                     'echo "plain from $QREXEC_REMOTE_DOMAIN"; [[ -n $BASH_VERSION ]] && cat')
    got = vm1.call(vm1.expect_connect(b"REQ1"), b"stdin\n")
    _check_call(got, b"plain from vm1\nstdin\n")
    # A dom0 command's stderr stays in dom0: the VM gets the empty message first.
    assert got[1] == (DATA_STDERR, b"")
    _, err = client.communicate(timeout=30)
    assert client.returncode == 0, err


def test_c_to_dom0_with_a_service_line_runs_the_service(host: Host) -> None:
    _dom0_service(host, "test.Echo", ECHO)
    vm1 = _pending(host)
    client = _client(host, "-d", "dom0", "-c", "REQ1,vm1,42",
                     "QUBESRPC test.Echo+c vm1 keyword adminvm")
    got = vm1.call(vm1.expect_connect(b"REQ1"), b"x\n")
    _check_call(got, b"arg=c src=vm1\nx\n")
    assert client.wait(30) == 0


@pytest.mark.parametrize(("cmdline", "status"), [
    ("QUBESRPC test.Echo+c", 125),            # one token: malformed
    ("QUBESRPCtest.Echo vm1", 125),          # no space after QUBESRPC
    ("QUBESRPC test.Missing+c vm1", 127),    # no such service
])
def test_c_to_dom0_that_cannot_run_answers_the_vm_with_its_status(
    host: Host, cmdline: str, status: int
) -> None:
    """Never a hang: the VM's request is answered and gets the failure's exit code."""
    _dom0_service(host, "test.Echo", ECHO)
    vm1 = _pending(host)
    client = _client(host, "-d", "dom0", "-c", "REQ1,vm1,42", cmdline)
    got = vm1.call(vm1.expect_connect(b"REQ1"), b"")
    assert got[0][0] == HELLO
    assert (DATA_STDOUT, b"") in got and (DATA_STDERR, b"") in got
    assert got[-1] == (DATA_EXIT_CODE, struct.pack("<i", status))
    assert client.wait(30) == status


def test_c_to_dom0_service_config_errors_are_125_like_in_a_vm(host: Host) -> None:
    _dom0_service(host, "test.Echo", ECHO)
    config = host.root / "rpc-config-dom0"
    config.mkdir()
    (config / "test.Echo").write_text("wait-for-session = maybe\n")
    vm1 = FakeSourceAgent(host, "--policy-exec", _policy_exec_wrapper(host, "exec sleep 60"))
    vm1.trigger("dom0", "test.Echo+c", ident=b"REQ1")
    wait_for(lambda: [p for p in marked_processes(host.mark) if is_program(p, "sleep")],
             what="the request to be pending")
    client = subprocess.Popen(
        [program("qrexec-client"), "--socket-dir", str(host.socket_dir), "-d", "dom0",
         "-c", "REQ1,vm1,42", "QUBESRPC test.Echo+c vm1 name dom0"],
        env=host.env(0, QREXEC_SERVICE_PATH=str(host.dom0_services),
                     QUBES_RPC_CONFIG_PATH=str(config)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = vm1.call(vm1.expect_connect(b"REQ1"), b"")
    assert got[-1] == (DATA_EXIT_CODE, struct.pack("<i", 125))
    assert client.wait(30) == 125


def test_c_with_an_unknown_request_exits_1_and_the_pending_one_still_works(
    host: Host
) -> None:
    _dom0_service(host, "test.Echo", ECHO)
    vm1 = _pending(host)
    wrong = _client(host, "-d", "dom0", "-c", "NOPE,vm1,42", "QUBESRPC test.Echo+c vm1")
    _, err = wrong.communicate(timeout=30)
    assert wrong.returncode == 1
    assert b"'NOPE' of vm1 is not pending" in err
    client = _client(host, "-d", "dom0", "-c", "REQ1,vm1,42", "QUBESRPC test.Echo+c vm1")
    _check_call(vm1.call(vm1.expect_connect(b"REQ1"), b"ok\n"), b"arg=c src=vm1\nok\n")
    assert client.wait(30) == 0


def test_c_to_a_vm_with_an_unknown_request_exits_1_before_starting_anything(
    host: Host
) -> None:
    vm2 = host.start_vm("vm2", 43)
    vm2.add_service("test.Echo", ECHO)
    _pending(host, target="vm2")
    wrong = _client(host, "-d", "vm2", "-c", "NOPE,vm1,42",
                    f"{vm2.user}:QUBESRPC test.Echo+c vm1")
    _, err = wrong.communicate(timeout=30)
    assert wrong.returncode == 1, err
    assert b"'NOPE' of vm1 is not pending" in err
    assert not vm2.agent_events("running")


@pytest.mark.parametrize("wait", [False, True])
def test_c_to_a_vm_connects_the_two_vms_directly(host: Host, wait: bool) -> None:
    """As the reference: the target's agent connects to the source VM's vchan."""
    vm2 = host.start_vm("vm2", 43)
    vm2.add_service("test.Echo", ECHO)
    vm1 = _pending(host, target="vm2")
    client = _client(host, "-d", "vm2", "-c", "REQ1,vm1,42", *(["-W"] if wait else []),
                     f"{vm2.user}:QUBESRPC test.Echo+c vm1")
    port = vm1.expect_connect(b"REQ1", domain=43)
    if not wait:
        # Without -W the client is done once both daemons were told.
        assert client.wait(30) == 0
    got = vm1.call(port, b"direct\n", peer=43)
    _check_call(got, b"arg=c src=vm1\ndirect\n")
    (running,) = vm2.agent_events("running")
    assert running["domain"] == 42  # the source VM, not dom0: no glue
    if wait:
        # -W: the client exits once the target's daemon released the port.
        assert client.wait(30) == 0
        assert vm2.daemon_events("port released")


def test_c_to_a_vm_that_is_not_running_is_137(host: Host) -> None:
    _pending(host, target="vm9")
    client = _client(host, "-d", "vm9", "-c", "REQ1,vm1,42", "user:QUBESRPC test.Echo vm1")
    _, err = client.communicate(timeout=30)
    assert client.returncode == 137
    assert b"vm9" in err


# -- dom0 to dom0 ------------------------------------------------------------------


def test_dom0_to_dom0_runs_the_service_in_place(host: Host) -> None:
    _dom0_service(host, "test.Echo", ECHO)
    client = _client(host, "-d", "dom0", "DEFAULT:QUBESRPC test.Echo+local dom0",
                     stdin=subprocess.PIPE)
    out, err = client.communicate(b"in dom0\n", timeout=30)
    assert client.returncode == 0, err
    assert out == b"arg=local src=dom0\nin dom0\n"


def test_dom0_to_dom0_with_at_adminvm_gives_the_service_exit_code(host: Host) -> None:
    _dom0_service(host, "test.Exit", "#!/bin/sh\necho $QREXEC_SERVICE_FULL_NAME\nexit 7\n")
    client = _client(host, "-d", "@adminvm", "DEFAULT:QUBESRPC test.Exit dom0")
    out, _ = client.communicate(timeout=30)
    assert (client.returncode, out) == (7, b"test.Exit\n")


@pytest.mark.parametrize(("cmdline", "status", "message"), [
    ("DEFAULT:QUBESRPC test.Missing dom0", 127, b"test.Missing"),
    ("DEFAULT:echo hi", 125, b"services only"),
    ("root:QUBESRPC test.Echo dom0", 125, b"must be DEFAULT"),
    ("DEFAULT:QUBESRPC test.Sock dom0", 125, b"socket service"),
])
def test_dom0_to_dom0_refusals(host: Host, cmdline: str, status: int, message: bytes) -> None:
    _dom0_service(host, "test.Echo", ECHO)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(host.dom0_services / "test.Sock"))
    client = _client(host, "-d", "dom0", cmdline)
    _, err = client.communicate(timeout=30)
    sock.close()
    assert client.returncode == status, err
    assert message in err


# -- dom0 to a VM --------------------------------------------------------------------


def test_exit_code_arrives_while_stdin_is_still_open(vm1: VM) -> None:
    """As the reference: the remote exit code ends the call; our stdin does not matter."""
    client = vm1.start_client(f"{vm1.user}:echo done; exit 4", stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    status = client.wait(30)  # stdin stays open all along
    assert status == 4 and time.monotonic() - started < 25
    assert client.stdout is not None and client.stdout.read() == b"done\n"
    assert client.stdin is not None
    client.stdin.close()


def test_stdout_is_closed_when_the_remote_stdout_ends(vm1: VM) -> None:
    """A reader of our stdout sees EOF while the remote service still runs."""
    client = vm1.start_client(f"{vm1.user}:echo early; exec >&-; sleep 5; exit 3",
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert client.stdout is not None
    assert client.stdout.read() == b"early\n"  # EOF before the service ends
    assert client.poll() is None
    assert client.wait(30) == 3


def test_use_stdin_socket_carries_both_directions(vm1: VM) -> None:
    ours, theirs = socket.socketpair()
    client = vm1.start_client(f"{vm1.user}:read x; echo got $x", "--use-stdin-socket",
                              stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    theirs.close()
    ours.sendall(b"hello\n")
    ours.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := ours.recv(4096):
        data += chunk
    assert data == b"got hello\n"
    assert client.wait(30) == 0


def test_use_stdin_socket_needs_a_stream_socket(vm1: VM) -> None:
    result = vm1.client(f"{vm1.user}:true", "--use-stdin-socket", input=b"")
    assert result.returncode == 2
    assert b"stdin not a socket" in result.stderr


class _Qubesd:
    """A qubesd stand-in that records each admin request and answers "0\\0"."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[bytes] = []
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._listener.settimeout(30)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self._listener.accept()
            with conn:
                request = b""
                while chunk := conn.recv(4096):
                    request += chunk
                self.requests.append(request)
                conn.sendall(b"0\0")

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


def test_k_kills_the_target_through_qubesd(host: Host) -> None:
    """-k asks the domain manager (qubesd's admin.vm.Kill) right before exiting."""
    vm1 = host.start_vm("vm1", 42)
    qubesd = _Qubesd(host.root / "qubesd.sock")
    try:
        result = subprocess.run(
            [program("qrexec-client"), "--socket-dir", str(host.socket_dir), "-k",
             "-d", "vm1", f"{vm1.user}:echo bye"],
            env=host.env(0, QREXEC_QUBESD_SOCKET=str(qubesd.path)),
            capture_output=True, timeout=30)
    finally:
        qubesd.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"bye\n"
    assert qubesd.requests == [b"admin.vm.Kill dom0 name vm1\0"]


# -- qubesd by default -----------------------------------------------------------------


def test_daemon_asks_the_standard_qubesd_socket_by_default() -> None:
    from qrexec_trio.roles.daemon import build_parser

    assert build_parser().parse_args(["42", "vm1"]).qubesd_socket == "/run/qubesd.sock"


def test_a_dispvm_call_without_qubesd_is_refused_naming_the_socket(host: Host) -> None:
    missing = host.root / "no-qubesd.sock"
    host.set_policy("test.Echo * vm1 @dispvm:dvm allow\n")
    system_info = host.root / "system-info.json"
    system_info.write_text(json.dumps({"domains": {
        "dom0": {"type": "AdminVM"}, "vm1": {"type": "AppVM"},
        "dvm": {"type": "AppVM", "template_for_dispvms": True}}}))
    vm1 = FakeSourceAgent(host, "--qubesd-socket", str(missing),
                          "--system-info", str(system_info))
    vm1.trigger("@dispvm:dvm", "test.Echo")
    vm1.expect_refused()
    wait_for(lambda: any(str(missing) in str(e) for e in vm1.vm.daemon_events("call failed")),
             what="the daemon to log the missing qubesd socket")
    # The daemon still serves its VM's next request.
    host.set_policy("test.Echo * vm1 dom0 allow\n")
    _dom0_service(host, "test.Echo", ECHO)
    vm1.trigger("dom0", "test.Echo", ident=b"SOCKET14")
    _check_call(vm1.call(vm1.expect_connect(b"SOCKET14"), b"y"), b"arg= src=vm1\ny")


# -- the reference's bytes ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["e1-vm-to-dom0-allow", "e3-vm-to-dom0-stderr"])
def test_c_to_dom0_sends_what_the_reference_daemon_child_sent(host: Host, scenario: str) -> None:
    """e1/e3 with ``qrexec-client -c`` as the reference daemon's child: on the
    daemon socket HELLO and the 40-byte MSG_SERVICE_CONNECT exactly; on the data
    vchan HELLO, the empty stderr first, the stdout, its EOF and the exit code
    (the service's stderr stays in dom0)."""

    _dom0_service(host, "test.Echo", ECHO)
    _dom0_service(host, "test.Err", '#!/bin/sh\necho "out arg=$1 src=$QREXEC_REMOTE_DOMAIN"\n'
                  "echo err >&2\nexit 3\n")
    records = [r for r in load(scenario) if not r.is_event]
    on_socket = [r for r in records if r.link == "client-socket"]
    daemon_hello, child_hello, connect, reply = on_socket
    daemon = listen_unix(host.socket_dir / "qrexec.vm1")
    service = "test.Err+arg" if scenario.startswith("e3") else "test.Echo+arg"
    client = _client(host, "-d", "dom0", "-c", "SOCKET13,vm1,42",
                     f"QUBESRPC {service} vm1 name dom0")
    ident = connect.payload[8:].rstrip(b"\0")
    peer = Peer(daemon.accept()[0])
    daemon.close()
    peer.send(daemon_hello.type, daemon_hello.payload)
    peer.expect(child_hello)
    got_type, got_payload = peer.receive()
    assert (got_type, got_payload) == (
        connect.type, connect.payload.replace(ident, b"SOCKET13".ljust(len(ident), b"\0")))
    port = int.from_bytes(reply.payload[4:8], "little")
    listener = listen_unix(host.vchan_dir / f"vchan.42.0.{port}.sock")  # client-vm's offer
    peer.send(reply.type, reply.payload)
    data = Peer(listener.accept()[0])
    listener.close()
    data_records = [r for r in records if r.link.startswith("data:")]
    for record in data_records:
        if record.sender == "client-vm:42":
            data.send(record.type, record.payload)
    got = receive_until_exit_code(data)
    data.close()
    peer.close()
    theirs = [r for r in data_records if r.sender != "client-vm:42"]
    assert got[0] == (theirs[0].type, theirs[0].payload)  # HELLO
    assert got[1] == (DATA_STDERR, b"")  # dom0 services send their (empty) stderr first
    assert _stream(got, DATA_STDOUT) == stream_bytes(theirs, DATA_STDOUT)
    assert _stream(got, DATA_STDERR) == b""
    assert got[-2:] == [(theirs[-2].type, theirs[-2].payload), (theirs[-1].type,
                                                                 theirs[-1].payload)]
    assert client.wait(30) == (3 if scenario.startswith("e3") else 0)


def test_c_to_dom0_honours_wait_for_session(host: Host) -> None:
    """The same rpc-config as in a VM: qubes.WaitForSession runs (and ends) first."""
    marker = host.root / "session-ran"
    _dom0_service(host, "qubes.WaitForSession",
                  f"#!/bin/sh\nread user\necho \"waited for '$user'\" > {marker}\n")
    _dom0_service(host, "test.After", f"#!/bin/sh\ncat {marker}\n")
    config = host.root / "rpc-config-dom0"
    config.mkdir()
    (config / "test.After").write_text("wait-for-session = true\n")
    vm1 = _pending(host)
    client = subprocess.Popen(
        [program("qrexec-client"), "--socket-dir", str(host.socket_dir), "-d", "dom0",
         "-c", "REQ1,vm1,42", "QUBESRPC test.After vm1 name dom0"],
        env=host.env(0, QREXEC_SERVICE_PATH=str(host.dom0_services),
                     QUBES_RPC_CONFIG_PATH=str(config)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = vm1.call(vm1.expect_connect(b"REQ1"), b"")
    # dom0's form has no user part: the waiter reads an empty name.
    _check_call(got, b"waited for ''\n")
    assert client.wait(30) == 0
