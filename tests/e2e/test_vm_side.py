"""VM-initiated calls, VM side: real qrexec-agent and qrexec-client-vm processes.

The test plays dom0: the daemon on the agent's control vchan (it reads the
forwarded triggers and answers them) and the far end of the data vchan (the
service side). Where the golden vectors fix the bytes (e1, e2), they are
checked byte for byte; the one thing that may differ is ``n`` in the
``SOCKET<n>`` ident, which is the agent's fd number.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from harness import VM, Host, program, wait_for
from vectors import Peer, Record, connect_unix, load

pytestmark = pytest.mark.socket_vchan_peer

HELLO = 0x300
DATA_STDIN, DATA_STDOUT, DATA_STDERR, DATA_EXIT_CODE = 0x190, 0x191, 0x192, 0x193
SERVICE_CONNECT, SERVICE_REFUSED = 0x202, 0x203
CONNECTION_TERMINATED, TRIGGER_SERVICE3, TRIGGER_SERVICE4 = 0x211, 0x212, 0x213
V4 = struct.pack("<I", 4)
ECHO_HEAD = b"arg=arg src=vm1\n"


def _ident(name: bytes) -> bytes:
    return name.ljust(32, b"\0")


def _trigger(target: bytes, service: bytes, ident: bytes, source: bytes = b"") -> bytes:
    return struct.pack("<64s64s32s", source, target, ident) + service + b"\0"


class Dom0:
    """vm1's qrexec-daemon, played by the test on the agent's control vchan."""

    def __init__(self, host: Host, version: int = 4) -> None:
        self.host = host
        self.ctl = Peer(connect_unix(host.vchan_dir / "vchan.42.0.512.sock"))
        assert self.ctl.receive() == (HELLO, V4)
        self.ctl.send(HELLO, struct.pack("<I", version))

    def receive(self) -> tuple[int, bytes]:
        message = self.ctl.receive()
        assert message is not None, "the agent closed the control vchan"
        return message

    def trigger(self) -> tuple[bytes, bytes]:
        """The next forwarded TRIGGER4: (its payload, its ident)."""
        msg_type, payload = self.receive()
        assert msg_type == TRIGGER_SERVICE4, f"expected a trigger, got 0x{msg_type:x}"
        return payload, payload[128:160].rstrip(b"\0")

    def connect(self, ident: bytes, port: int = 513, domain: int = 0) -> None:
        self.ctl.send(SERVICE_CONNECT, struct.pack("<II", domain, port) + _ident(ident))

    def refuse(self, ident: bytes) -> None:
        self.ctl.send(SERVICE_REFUSED, _ident(ident))

    def expect_terminated(self, port: int = 513, domain: int = 0) -> None:
        assert self.receive() == (CONNECTION_TERMINATED, struct.pack("<II", domain, port))


class Service:
    """The service side of a data vchan that vm1 (agent or client-vm) serves."""

    def __init__(self, host: Host, port: int = 513) -> None:
        self.data = Peer(connect_unix(host.vchan_dir / f"vchan.42.0.{port}.sock"))
        self.data.send(HELLO, V4)
        assert self.data.receive() == (HELLO, V4)

    def send(self, msg_type: int, payload: bytes = b"") -> None:
        self.data.send(msg_type, payload)

    def read_stdin(self) -> bytes:
        """The caller's input up to its STDIN EOF."""
        received = b""
        while True:
            message = self.data.receive()
            assert message is not None, "the caller closed before its STDIN EOF"
            assert message[0] == DATA_STDIN
            if not message[1]:
                return received
            received += message[1]

    def finish(self, status: int) -> None:
        self.send(DATA_EXIT_CODE, struct.pack("<i", status))
        self.data.close()

    def echo(self, stderr: bytes = b"", status: int = 0) -> bytes:
        """test.Echo+arg from vm1, as dom0 runs it; returns what the caller sent."""
        self.send(DATA_STDERR, stderr)
        if stderr:
            self.send(DATA_STDERR, b"")
        self.send(DATA_STDOUT, ECHO_HEAD)
        received = self.read_stdin()
        self.send(DATA_STDOUT, received)
        self.send(DATA_STDOUT, b"")
        self.finish(status)
        return received


def _socket_path(vm: VM) -> Path:
    return vm.runtime_dir / "qrexec-agent"


def _start_agent(host: Host, **env: str) -> tuple[VM, Dom0]:
    """vm1's agent, with extra environment (harness's start_agent takes none)."""
    vm = host.add_vm("vm1", 42)
    with open(vm.agent_log, "ab") as log:
        vm.agent = subprocess.Popen(
            [program("qrexec-agent"), "--runtime-dir", str(vm.runtime_dir),
             "--log-level", "debug"],
            env=host.env(42, QREXEC_SERVICE_PATH=str(vm.service_dir), **env),
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
    return vm, Dom0(host)


@pytest.fixture
def vm1(host: Host) -> tuple[VM, Dom0]:
    return _start_agent(host)


def client_vm(vm: VM, *args: str, stdin: bytes = b"", trigger_socket: bool = False,
              agent_socket: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    options = ["--use-trigger-socket"] if trigger_socket else []
    proc = subprocess.Popen(
        [program("qrexec-client-vm"), "-a", str(agent_socket or _socket_path(vm)), *options,
         *args],
        env=vm.host.env(42, **env),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    proc.stdin = None  # so that communicate() does not flush it
    return proc


def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def _logged(vm: VM, event: str, text: str = "") -> bool:
    return any(text in str(e) for e in vm.agent_events(event))


# -- today's trigger socket, byte for byte against the vectors ------------------------


def _e1(link: str, name: str) -> Record:
    return next(r for r in load("e1-vm-to-dom0-allow") if r.link == link and r.name == name)


def _with_ident(payload: bytes, start: int, ident: bytes) -> bytes:
    return payload[:start] + _ident(ident) + payload[start + 32:]


@pytest.mark.parametrize("version", [4, 3])
def test_agent_forwards_and_connects_like_the_reference_e1(host: Host, version: int) -> None:
    vm = host.add_vm("vm1", 42)
    vm.start_agent()
    dom0 = Dom0(host, version)
    client = Peer(connect_unix(_socket_path(vm)))
    sent = _e1("client-vm-socket", "MSG_TRIGGER_SERVICE4")
    client.send(sent.type, sent.payload)
    msg_type, forwarded = dom0.receive()
    expected = _e1("control", "MSG_TRIGGER_SERVICE4").payload
    if version == 3:  # TRIGGER3 is TRIGGER4 without the source field
        assert msg_type == TRIGGER_SERVICE3
        forwarded = bytes(64) + forwarded
    else:
        assert msg_type == sent.type
    ident = forwarded[128:160].rstrip(b"\0")
    assert re.fullmatch(rb"SOCKET\d+", ident), ident
    assert forwarded == _with_ident(expected, 128, ident)
    connect = _e1("control", "MSG_SERVICE_CONNECT")
    dom0.ctl.send(connect.type, _with_ident(connect.payload, 8, ident))
    assert client.receive_raw(8) == _e1("client-vm-socket", "RAW").payload
    client.close()
    terminated = _e1("control", "MSG_CONNECTION_TERMINATED")
    assert dom0.receive() == (terminated.type, terminated.payload)


def test_client_vm_sends_and_calls_like_the_reference_e1(host: Host, short_tmp: Path) -> None:
    vm = host.add_vm("vm1", 42)
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    agent.bind(str(short_tmp / "agent.sock"))
    agent.listen(1)
    agent.settimeout(20)
    proc = client_vm(vm, "dom0", "test.Echo+arg", stdin=b"to-dom0\n", trigger_socket=True,
                     agent_socket=short_tmp / "agent.sock")
    trigger = Peer(agent.accept()[0])
    agent.close()
    expected = _e1("client-vm-socket", "MSG_TRIGGER_SERVICE4")
    assert trigger.receive() == (expected.type, expected.payload)
    trigger.sock.sendall(_e1("client-vm-socket", "RAW").payload)  # {0, 513}
    service = Service(host)
    assert service.echo() == b"to-dom0\n"
    status, out, err = _finish(proc)
    assert (status, out, err) == (0, ECHO_HEAD + b"to-dom0\n", b"")
    trigger.expect_eof()  # closing the trigger socket is how the agent learns the end


def test_refusal_on_todays_socket_e2(vm1: tuple[VM, Dom0]) -> None:
    vm, dom0 = vm1
    proc = client_vm(vm, "dom0", "test.Echo+arg", stdin=b"to-dom0\n", trigger_socket=True)
    payload, ident = dom0.trigger()
    assert payload == _trigger(b"dom0", b"test.Echo+arg", ident)
    dom0.refuse(ident)
    assert _finish(proc) == (126, b"", b"Request refused\n")
    # No CONNECTION_TERMINATED after a refusal: the next message is the next request.
    proc = client_vm(vm, "dom0", "test.Other", trigger_socket=True)
    payload, ident = dom0.trigger()
    assert payload.endswith(b"test.Other\0")
    dom0.refuse(ident)
    assert _finish(proc)[0] == 126


def test_allowed_call_on_todays_socket_end_to_end(vm1: tuple[VM, Dom0]) -> None:
    vm, dom0 = vm1
    proc = client_vm(vm, "$default", "test.Echo+arg", stdin=b"to-dom0\n", trigger_socket=True)
    payload, ident = dom0.trigger()
    assert payload == _trigger(b"@default", b"test.Echo+arg", ident)
    dom0.connect(ident)
    assert Service(host=vm.host).echo(stderr=b"remote err\n", status=5) == b"to-dom0\n"
    assert _finish(proc) == (5, ECHO_HEAD + b"to-dom0\n", b"remote err\n")
    dom0.expect_terminated()


def test_program_on_todays_socket_runs_as_a_child(vm1: tuple[VM, Dom0]) -> None:
    vm, dom0 = vm1
    # SAVED_FD_1 is client-vm's own stdout, as on the R2 path.
    script = 'read x; echo "prog got $x"; echo saved > /proc/self/fd/$SAVED_FD_1; exit 4'
    proc = client_vm(vm, "dom0", "test.Echo+arg", "sh", "-c", script, trigger_socket=True)
    _, ident = dom0.trigger()
    dom0.connect(ident)
    service = Service(vm.host)
    service.send(DATA_STDERR, b"remote err\n")
    service.send(DATA_STDOUT, b"hello\n")
    assert service.read_stdin() == b"prog got hello\n"
    service.finish(0)
    # The remote status is 0, so PROG's is the result; remote stderr reaches ours.
    assert _finish(proc) == (4, b"saved\n", b"remote err\n")
    dom0.expect_terminated()


# -- the R2 path ----------------------------------------------------------------------


def _cid_trigger(dom0: Dom0, target: bytes = b"dom0",
                 service: bytes = b"test.Echo+arg") -> bytes:
    payload, cid = dom0.trigger()
    assert re.fullmatch(rb"\d+ \d+ \d+", cid), cid
    assert payload == _trigger(target, service, cid)
    return cid


def test_r2_call_relays_data_stderr_and_exit_code(vm1: tuple[VM, Dom0]) -> None:
    vm, dom0 = vm1
    proc = client_vm(vm, "dom0", "test.Echo+arg", stdin=b"to-dom0\n")
    cid = _cid_trigger(dom0)
    dom0.connect(cid)
    assert Service(vm.host).echo(stderr=b"remote err\n", status=3) == b"to-dom0\n"
    assert _finish(proc) == (3, ECHO_HEAD + b"to-dom0\n", b"remote err\n")
    dom0.expect_terminated()


def test_r2_refusal_exits_126(vm1: tuple[VM, Dom0]) -> None:
    vm, dom0 = vm1
    proc = client_vm(vm, "vm2", "test.Echo+arg")
    dom0.refuse(_cid_trigger(dom0, target=b"vm2"))
    assert _finish(proc) == (126, b"", b"Request refused\n")


def test_r2_program_gets_the_sockets_and_its_status_is_the_result(
    vm1: tuple[VM, Dom0],
) -> None:
    vm, dom0 = vm1
    # PROG's own options pass through; SAVED_FD_1 is our original stdout.
    script = 'read x; echo "prog got $x"; echo "saved $x" >&"$SAVED_FD_1"; exit 7'
    proc = client_vm(vm, "dom0", "test.Echo+arg", "sh", "-c", script)
    dom0.connect(_cid_trigger(dom0))
    service = Service(vm.host)
    service.send(DATA_STDOUT, b"hello\n")
    service.send(DATA_STDOUT, b"")
    assert service.read_stdin() == b"prog got hello\n"
    service.finish(0)
    assert _finish(proc) == (7, b"saved hello\n", b"")
    dom0.expect_terminated()


def _write_fifo(vm: VM, record: bytes) -> None:
    fd = os.open(f"{_socket_path(vm)}-fifo", os.O_WRONLY | os.O_NONBLOCK)
    try:
        assert os.write(fd, record) == len(record)
    finally:
        os.close(fd)


def _record(cid: bytes, service: bytes = b"test.Echo+arg", target: bytes = b"dom0") -> bytes:
    return struct.pack("64s32s32s", service, target, cid)


def test_forged_and_reused_ids_are_refused_and_a_real_call_goes_on(
    vm1: tuple[VM, Dom0],
) -> None:
    vm, dom0 = vm1
    proc = client_vm(vm, "dom0", "test.Echo+arg", stdin=b"x")
    cid = _cid_trigger(dom0)
    forged = [
        (_record(b"0 1 2"), "not an unclaimed fdpass socket"),  # fds the agent has, not ours
        (_record(cid), "not an unclaimed fdpass socket"),  # already claimed
        (_record(b"1 1 1"), "not distinct"),
        (_record(b"01 2 3"), "malformed"),
    ]
    for record, _ in forged:
        _write_fifo(vm, record)
    _write_fifo(vm, b"\xff" * 128)  # no NUL anywhere
    for _, reason in forged:
        wait_for(lambda reason=reason: _logged(vm, "R2 request refused: bad connection id",
                                               reason), what=f"refusal: {reason}")
    wait_for(lambda: _logged(vm, "trigger record dropped", "not NUL-terminated"),
             what="the malformed record to be dropped")
    # Nothing was forwarded for them, and the real call is undisturbed.
    dom0.connect(cid)
    assert Service(vm.host).echo() == b"x"
    assert _finish(proc) == (0, ECHO_HEAD + b"x", b"")
    dom0.expect_terminated()


def test_unclaimed_sockets_expire_and_their_stale_id_is_refused(host: Host) -> None:
    vm, dom0 = _start_agent(host, QREXEC_TIMEOUT_CID_CLAIM="1")
    handed = []
    for _ in range(3):
        sock = connect_unix(Path(f"{_socket_path(vm)}-fdpass"))
        sock.settimeout(20)
        handed.append((sock, struct.unpack("<i", sock.recv(4))[0]))
    for sock, _ in handed:
        assert sock.recv(1) == b"", "an unclaimed socket was not closed"
        sock.close()
    wait_for(lambda: len(vm.agent_events("fdpass socket closed unclaimed")) == 3,
             what="the three expiries to be logged")
    _write_fifo(vm, _record(b" ".join(b"%d" % n for _, n in handed)))
    wait_for(lambda: _logged(vm, "R2 request refused: bad connection id"),
             what="the stale id to be refused")
    # The next message dom0 sees is a later request, not the stale one.
    client = Peer(connect_unix(_socket_path(vm)))
    client.send(TRIGGER_SERVICE4, _trigger(b"dom0", b"test.Later", b"SOCKET"))
    payload, _ = dom0.trigger()
    assert payload.endswith(b"test.Later\0")


# -- answers and input that match nothing ----------------------------------------------


def test_answers_for_unknown_requests_and_bad_triggers_are_ignored(
    vm1: tuple[VM, Dom0],
) -> None:
    vm, dom0 = vm1
    dom0.connect(b"SOCKET99")
    dom0.refuse(b"1 2 3")
    dom0.ctl.send(SERVICE_REFUSED, b"SOCKET9\0junk" + bytes(20))  # not even a valid ident
    wait_for(lambda: _logged(vm, "SERVICE_CONNECT for no pending request; ignored"),
             what="the unknown connect to be logged")
    wait_for(lambda: _logged(vm, "unreadable message from dom0; ignored"),
             what="the unreadable refusal to be logged")
    bad = Peer(connect_unix(_socket_path(vm)))
    bad.send(TRIGGER_SERVICE4, _trigger(b"dom0", b"bad/name", b"SOCKET"))
    bad.expect_eof()
    wait_for(lambda: _logged(vm, "invalid trigger refused", "service_name"),
             what="the bad name to be logged")
    # The control link and the request side still work.
    proc = client_vm(vm, "dom0", "test.Echo+arg", stdin=b"still")
    dom0.connect(_cid_trigger(dom0))
    assert Service(vm.host).echo() == b"still"
    assert _finish(proc)[0] == 0
    dom0.expect_terminated()


def test_client_vm_checks_names_and_reports_a_missing_agent(host: Host) -> None:
    vm = host.add_vm("vm1", 42)
    status, out, err = _finish(client_vm(vm, "dom0", "bad/name"))
    assert (status, out) == (1, b"") and b"service_name" in err
    status, out, err = _finish(client_vm(vm, "dom0", "test.Echo"))
    assert status == 1 and b"qrexec-agent is not running" in err


def test_agent_shutdown_closes_pending_requests_and_removes_its_files(
    vm1: tuple[VM, Dom0],
) -> None:
    vm, dom0 = vm1
    pending = Peer(connect_unix(_socket_path(vm)))
    pending.send(TRIGGER_SERVICE4, _trigger(b"dom0", b"test.Echo", b"SOCKET"))
    dom0.trigger()
    assert vm.agent is not None
    vm.agent.send_signal(signal.SIGTERM)
    assert vm.agent.wait(20) == 0
    pending.expect_eof()
    names = ("qrexec-agent", "qrexec-agent-fdpass", "qrexec-agent-fifo")
    assert not [n for n in names if (vm.runtime_dir / n).exists()]


# -- the caller going away ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["r2", "trigger-socket"])
def test_killing_client_vm_mid_call_ends_the_call(host: Host, path: str) -> None:
    vm, dom0 = _start_agent(host, QREXEC_TIMEOUT_KILL_GRACE="0.2")
    proc = subprocess.Popen(
        [program("qrexec-client-vm"), "-a", str(_socket_path(vm)),
         *(["--use-trigger-socket"] if path != "r2" else []), "dom0", "test.Echo"],
        env=host.env(42), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    _, ident = dom0.trigger()
    dom0.connect(ident)
    service = Service(host)
    service.send(DATA_STDOUT, b"partial\n")
    assert proc.stdout.readline() == b"partial\n"  # the call is running
    proc.kill()
    proc.wait()
    # The service side sees its caller go: the data vchan ends without more than
    # the caller's input EOF, and dom0 hears that the connection terminated.
    while (message := service.data.receive()) is not None:
        assert message == (DATA_STDIN, b"")
    dom0.expect_terminated()
