"""Replays of the second capture's transcripts (tests/data/vectors, README section 8)
against our agent, and e3 against our daemon.

As in test_vector_replay.py, the test plays dom0: the daemon on the control
vchan and qrexec-client on the data vchan, with the recorded bytes (the cmdline's
``qtest:`` becomes the test's own user, len adjusted; see that module). The
service side's messages are checked with its ``_check_service_side``: byte for
byte where the README says so, within the allowed variations elsewhere.

Socket and TCP services are served by this test, as the relay served them in
the capture (README 8.1). The TCP servers listen on the ports the transcripts
use, 127.0.0.1:39001 and 127.0.0.1:39002: j2's cmdline carries ``+39002``, and
it is a control-vchan record, which must match byte for byte. Rewriting it
for another port would replay bytes the reference never sent.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import VM, Host
from vectors import (
    MSG_DATA_EXIT_CODE,
    MSG_DATA_STDERR,
    MSG_DATA_STDIN,
    MSG_DATA_STDOUT,
    MSG_HELLO,
    VECTORS,
    Peer,
    Record,
    connect_unix,
    listen_unix,
    load,
    scenario_info,
    stream_bytes,
)

from .test_vector_replay import ECHO, _check_service_side, _data_records, _with_user

pytestmark = pytest.mark.socket_vchan_peer

SERVICE_TIMEOUT = 20.0


# --- playing dom0 against our agent ------------------------------------------


@dataclass
class Call:
    scenario: str
    records: list[Record]
    ctl: Peer
    data: Peer
    caller: list[Record]
    service: list[Record]
    got: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def exit_seq(self) -> int:
        return next(r.seq for r in self.service if r.type == MSG_DATA_EXIT_CODE)

    def send_caller(self, records: list[Record] | None = None) -> None:
        """The caller's records that the reference sent before the exit code."""
        for record in self.caller if records is None else records:
            if record.seq < self.exit_seq:
                self.data.send(record.type, record.payload)

    def receive_all(self) -> None:
        while (message := self.data.receive()) is not None:
            self.got.append(message)
        self.data.close()

    def finish(self) -> None:
        """Check the service side and the CONNECTION_TERMINATED that follows."""
        _check_service_side(self.got, self.service)
        info = scenario_info(self.scenario)
        assert int.from_bytes(self.got[-1][1], "little") == info["client_exit_code"]
        stdout = b"".join(p for t, p in self.got if t == MSG_DATA_STDOUT)
        assert stdout == info["client_stdout"]["text"].encode()
        control = [r for r in self.records if r.link == "control" and not r.is_event]
        (terminated,) = [r for r in control if r.name == "MSG_CONNECTION_TERMINATED"]
        self.ctl.expect(terminated)
        self.ctl.close()


def _full_name(scenario: str) -> str:
    (name,) = [p.stem for p in VECTORS.glob(f"{scenario}-*.jsonl")]
    return name


def _open(host: Host, vm: VM, scenario: str,
          on_connect: Callable[[], None] | None = None) -> Call:
    """Start our agent, play the daemon's side of the control vchan, accept the data vchan."""
    scenario = _full_name(scenario)
    vm.start_agent()
    records = load(scenario)
    control = [r for r in records if r.link == "control" and not r.is_event]
    ctl = Peer(connect_unix(host.vchan_dir / "vchan.42.0.512.sock"))
    ctl.expect(control[0])  # the agent's HELLO
    ctl.send(control[1].type, control[1].payload)  # the daemon echoes it
    request = control[2]
    assert request.name == "MSG_EXEC_CMDLINE"
    port = int.from_bytes(request.payload[4:8], "little")
    listener = listen_unix(host.vchan_dir / f"vchan.0.42.{port}.sock")
    ctl.send(request.type, _with_user(request.payload, vm.user))
    data = Peer(listener.accept()[0])
    if on_connect is not None:
        on_connect()
    listener.close()
    caller, service = _data_records(records, port)
    return Call(scenario, records, ctl, data, caller, service)


@pytest.fixture
def vm(host: Host) -> VM:
    return host.add_vm("vm1", 42)


# --- the socket service (README 8.1) ------------------------------------------


@dataclass
class Served:
    """What the service read from our agent, and whether our agent's EOF came."""

    received: bytes = b""
    eof: bool = False
    sent: bytes = b""
    error: BaseException | None = None


def _serve_once(listener: socket.socket, served: Served, descriptor: bool, bye: bool) -> None:
    """Read the descriptor up to its NUL (unless not ``descriptor``), then echo what is
    read and close after EOF; or, with ``bye``, answer the first stdin bytes with
    ``bye\\n``, shut down the write side at once, and read on until EOF."""
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(SERVICE_TIMEOUT)

            def read() -> bytes:
                chunk = conn.recv(65536)
                served.received += chunk
                served.eof = not chunk
                return chunk

            if descriptor:
                while b"\0" not in served.received and read():
                    pass
            stdin_so_far = served.received.partition(b"\0")[2] if descriptor else b""
            if bye:
                while not stdin_so_far and not served.eof:
                    stdin_so_far += read()
                conn.sendall(b"bye\n")
                served.sent += b"bye\n"
                conn.shutdown(socket.SHUT_WR)
                while read():
                    pass
                return
            if stdin_so_far:
                conn.sendall(stdin_so_far)
                served.sent += stdin_so_far
            while chunk := read():
                conn.sendall(chunk)
                served.sent += chunk
    except BaseException as error:  # reported by the test, not lost in the thread
        served.error = error


@contextmanager
def _serving(listener: socket.socket, *, descriptor: bool = True,
             bye: bool = False) -> Iterator[Served]:
    listener.listen(1)
    listener.settimeout(SERVICE_TIMEOUT)
    served = Served()
    thread = threading.Thread(target=_serve_once, args=(listener, served, descriptor, bye),
                              daemon=True)
    thread.start()
    try:
        yield served
    finally:
        thread.join(SERVICE_TIMEOUT + 5)
        listener.close()
    assert not thread.is_alive(), "the socket service is still waiting"
    assert served.error is None, repr(served.error)


def _unix_listener(vm: VM) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(vm.service_dir / "test.Sock"))
    return listener


def _tcp_listener(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))  # the transcripts' port, loopback only
    return listener


def _service_socket(call: Call, sender: str) -> list[Record]:
    return [r for r in call.records
            if r.link == "service-socket" and r.sender == sender and r.kind == "raw"]


def _check_served(call: Call, served: Served, *, descriptor: bytes | None) -> None:
    """The bytes our agent wrote to the socket service, exactly; and what it got back."""
    want_in = b"".join(r.payload for r in _service_socket(call, "agent:42/child"))
    want_out = b"".join(r.payload for r in _service_socket(call, "socket-service"))
    assert served.received == want_in, (served.received, want_in)
    assert served.sent == want_out
    assert served.eof, "our agent never closed its end of the service socket"
    first = _service_socket(call, "agent:42/child")[0].payload
    if descriptor is None:
        assert b"\0" not in first  # no descriptor (skip-service-descriptor)
    else:
        assert first == descriptor
        assert served.received.startswith(descriptor)


# --- i1, i2, i3, j1, j2: socket and TCP services -------------------------------


@pytest.mark.parametrize(("scenario", "config", "descriptor"), [
    ("i1", None, b"test.Sock+arg dom0\0"),
    ("i2", "skip-service-descriptor = true\n", None),
])
def test_socket_service(scenario: str, config: str | None, descriptor: bytes | None,
                        host: Host, vm: VM) -> None:
    """i1/i2: the descriptor (or none), the stdin, our EOF after ``STDIN ""``; on the
    vchan ``STDERR ""`` (no stderr for a socket), the echo, exit code 0."""
    if config is not None:
        vm.add_config("test.Sock", config)
    with _serving(_unix_listener(vm), descriptor=descriptor is not None) as served:
        call = _open(host, vm, scenario)
        call.send_caller()
        call.receive_all()
    _check_served(call, served, descriptor=descriptor)
    call.finish()


def test_socket_service_exit_on_service_eof_i3(host: Host, vm: VM) -> None:
    """i3: the service answers ``bye`` and shuts down its side; the call ends at once,
    while the caller's stdin is still open (no ``STDIN ""`` was ever sent)."""
    vm.add_config("test.Sock", "exit-on-service-eof = true\n")
    with _serving(_unix_listener(vm), bye=True) as served:
        call = _open(host, vm, "i3")
        assert not any(r.type == MSG_DATA_STDIN and r.payload == b"" for r in call.caller)
        call.send_caller()  # HELLO and "ping\n": stdin stays open
        started = time.monotonic()
        call.receive_all()  # the exit code, then our agent closes the vchan
        assert time.monotonic() - started < 3, "the call waited for the caller's EOF"
    _check_served(call, served, descriptor=b"test.Sock+arg dom0\0")
    call.finish()


@pytest.mark.parametrize(("scenario", "service", "target", "port", "descriptor"), [
    ("j1", "test.Tcp", "/dev/tcp/127.0.0.1/39001", 39001, b"test.Tcp dom0\0"),
    ("j2", "test.Tcp2", "/dev/tcp/127.0.0.1", 39002, b"test.Tcp2+39002 dom0\0"),
])
def test_tcp_service(scenario: str, service: str, target: str, port: int, descriptor: bytes,
                     host: Host, vm: VM) -> None:
    """j1/j2: as i1 over TCP; the descriptor is the cmdline text, ``+39002`` kept."""
    (vm.service_dir / service).symlink_to(target)
    with _serving(_tcp_listener(port)) as served:
        call = _open(host, vm, scenario)
        call.send_caller()
        call.receive_all()
    _check_served(call, served, descriptor=descriptor)
    call.finish()


def test_tcp_service_refuses_an_argument_j3(host: Host, vm: VM) -> None:
    """j3: ``STDOUT ""``, ``STDERR ""``, exit 125; the TCP server is never contacted."""
    (vm.service_dir / "test.Tcp").symlink_to("/dev/tcp/127.0.0.1/39001")
    listener = _tcp_listener(39001)
    listener.listen(1)
    listener.setblocking(False)
    with listener:
        call = _open(host, vm, "j3")
        call.send_caller()
        call.receive_all()
        with pytest.raises(BlockingIOError):
            listener.accept()[0].close()  # nobody connected
    call.finish()
    reasons = [e.get("reason", "") for e in vm.agent_events("cannot run command")]
    assert "Unexpected argument arg to service /dev/tcp/127.0.0.1" in reasons


# --- k2: the SIGUSR1 switch ------------------------------------------------------


def test_sigusr1_switch_k2(host: Host, vm: VM) -> None:
    """k2: ``hello`` comes before any stdin; the caller's stdin goes out only then
    (as the upstream test does); what the service writes to fd 0 is stdout, with
    one ``STDOUT ""`` only."""
    vm.add_service("test.Usr1", '#!/bin/sh\nkill -USR1 $QREXEC_AGENT_PID; echo hello >&0; '
                                'read x; echo "received: $x" >&0\n')
    call = _open(host, vm, "k2")
    hello, *stdin = call.caller
    assert hello.type == MSG_HELLO and [r.payload for r in stdin] == [b"stdin\n"]
    call.send_caller([hello])
    while b"".join(p for t, p in call.got if t == MSG_DATA_STDOUT) != b"hello\n":
        message = call.data.receive()
        assert message is not None, f"closed before hello: {call.got}"
        assert message[0] in (MSG_HELLO, MSG_DATA_STDOUT), message
        assert message != (MSG_DATA_STDOUT, b""), "stdout ended before the switch"
        call.got.append(message)
    call.send_caller(stdin)
    call.receive_all()
    call.finish()


# --- l: wait-for-session ---------------------------------------------------------


def test_wait_for_session_l(host: Host, vm: VM) -> None:
    """l: qubes.WaitForSession runs first (no argument, src dom0, the user on its
    stdin); the data vchan connects only after it ended; then a normal call."""
    log = host.root / "services.log"
    vm.add_service("qubes.WaitForSession", (
        "#!/bin/sh\nread user\n"
        f'echo "$(date +%s.%N) WaitForSession start arg=[$1] src=$QREXEC_REMOTE_DOMAIN '
        f'user=$user" >>{log}\nsleep 1\necho "$(date +%s.%N) WaitForSession end" >>{log}\n'))
    vm.add_service("test.Wfs", (
        f'#!/bin/sh\necho "$(date +%s.%N) test.Wfs start arg=[$1] '
        f'src=$QREXEC_REMOTE_DOMAIN" >>{log}\n'
        f'echo "wfs arg=$1"; cat\necho "$(date +%s.%N) test.Wfs end" >>{log}\n'))
    vm.add_config("test.Wfs", "wait-for-session = 1\n")
    at_connect: list[str] = []

    call = _open(host, vm, "l", on_connect=lambda: at_connect.extend(_log_lines(log)))
    assert at_connect == [
        f"WaitForSession start arg=[] src=dom0 user={vm.user}", "WaitForSession end",
    ], "the data vchan connected before qubes.WaitForSession ended"
    call.send_caller()
    call.receive_all()
    call.finish()
    assert _log_lines(log) == [*at_connect, "test.Wfs start arg=[arg] src=dom0", "test.Wfs end"]
    wfs_times = [float(line.split()[0]) for line in log.read_text().splitlines()[:2]]
    assert wfs_times[1] - wfs_times[0] >= 0.9


def _log_lines(log: Path) -> list[str]:
    """The log's lines without their timestamps."""
    if not log.exists():
        return []
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


# --- m: an invalid rpc-config ------------------------------------------------------


def test_invalid_rpc_config_m(host: Host, vm: VM) -> None:
    """m: the double quotes are refused; 125 after a normal data-vchan connection,
    without running the service."""
    marker = host.root / "ran"
    vm.add_service("test.Echo", ECHO.replace("#!/bin/sh\n", f"#!/bin/sh\ntouch {marker}\n"))
    vm.add_config("test.Echo", 'wait-for-session = "maybe"\n')
    call = _open(host, vm, "m")  # the data vchan connected
    call.send_caller()
    call.receive_all()
    call.finish()
    assert not marker.exists(), "the service ran"


# --- o: 256 KiB of stdin before the service reads ----------------------------------


def test_stdin_256k_before_the_service_reads_o(host: Host, vm: VM) -> None:
    """o: all 256 KiB (the reference client's chunks) and ``STDIN ""`` go in while the
    service still sleeps: no back-pressure reaches the caller."""
    vm.add_service("test.Count", "#!/bin/sh\nsleep 1; wc -c\n")
    call = _open(host, vm, "o")
    assert [len(r.payload) for r in call.caller[1:]] == [65528, 61448, 65528, 61448, 8192, 0]
    assert len(stream_bytes(call.caller, MSG_DATA_STDIN)) == 262144
    started = time.monotonic()
    call.data.sock.settimeout(0.9)  # the service sleeps 1 s before it reads
    call.send_caller()
    took = time.monotonic() - started
    call.data.sock.settimeout(None)
    assert took < 0.9, f"sending the stdin took {took:.2f}s: back-pressure"
    call.receive_all()
    call.finish()


# --- e3: VM -> dom0 through our daemon ------------------------------------------------


def test_daemon_vm_to_dom0_with_stderr_e3(host: Host) -> None:
    """e3: as e1 (test_vector_replay.py), with a dom0 service that writes stderr and
    exits 3: ``STDERR ""`` only (the line is not forwarded), stdout, exit 3."""
    service = host.dom0_services / "test.Err"
    service.write_text('#!/bin/sh\necho "out arg=$1 src=$QREXEC_REMOTE_DOMAIN"; '
                       'echo "err line" >&2; exit 3\n')
    service.chmod(0o755)
    host.set_policy("test.Err * vm1 dom0 allow\n")
    records = load("e3-vm-to-dom0-stderr")
    control = [r for r in records if r.link == "control" and not r.is_event]
    vm, control_socket = host.start_daemon_for_fake_agent("vm1", 42, "qtest")
    ctl = Peer(control_socket)
    hello, echo, trigger, connect, terminated = control
    assert len(trigger.payload) == 173
    ctl.send(hello.type, hello.payload)
    ctl.expect(echo)
    ctl.send(trigger.type, trigger.payload)
    ctl.expect(connect)  # SERVICE_CONNECT {0, 513} + "SOCKET12", exactly
    data_records = [r for r in records if r.link == "data:513" and not r.is_event]
    caller = [r for r in data_records if r.sender == "client-vm:42"]
    dom0_side = [r for r in data_records if r.sender != "client-vm:42"]
    listener = listen_unix(host.vchan_dir / "vchan.42.0.513.sock")  # client-vm's offer
    data = Peer(listener.accept()[0])
    listener.close()
    exit_seq = next(r.seq for r in dom0_side if r.type == MSG_DATA_EXIT_CODE)
    late = [r for r in caller if r.seq > exit_seq]
    assert [r.type for r in late] == [MSG_DATA_STDIN, MSG_DATA_STDIN]
    for record in caller:
        if record.seq < exit_seq:
            data.send(record.type, record.payload)
    got = []
    while (message := data.receive()) is not None:
        got.append(message)
        if message[0] == MSG_DATA_EXIT_CODE:
            for record in late:  # as client-vm did: its stdin after the exit code
                try:
                    data.send(record.type, record.payload)
                except (BrokenPipeError, ConnectionResetError):
                    break
    data.close()
    # What e3 is about (README 8.2): the dom0 service's stderr stays in dom0 (the
    # reference's went to qrexec-daemon's own stderr), so ``STDERR ""`` comes first.
    stderr = b"".join(p for t, p in got if t == MSG_DATA_STDERR)
    assert stderr == stream_bytes(dom0_side, MSG_DATA_STDERR) == b"", (
        f"the dom0 service's stderr crossed the vchan: {stderr!r}; messages: {got}")
    assert got[1] == (MSG_DATA_STDERR, b""), f"STDERR \"\" is not first: {got}"
    _check_service_side(got, dom0_side)
    assert int.from_bytes(got[-1][1], "little") == 3
    ctl.send(terminated.type, terminated.payload)
    assert vm.daemon is not None and vm.daemon.poll() is None, "the daemon died"
    assert b"err line" in vm.daemon_log.read_bytes(), "the service's stderr went nowhere"
