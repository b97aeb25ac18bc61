"""Socket and TCP services end to end (golden scenarios i1, j1, j2, j3): the
real qrexec-client, qrexec-daemon and qrexec-agent, and a service served by
this test (a unix socket in the VM's service dir, or a TCP listener on
127.0.0.1 behind a ``/dev/tcp`` symlink). The configuration-dependent
behaviours are replayed from the golden transcripts in
test_vector_replay_services.py and unit-tested."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from harness import VM


def _echo_once(listener: socket.socket, seen: dict[str, bytes]) -> None:
    """Read the descriptor and the input up to EOF (our half-close), echo the input, close."""
    listener.settimeout(30)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(30)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        descriptor, _, rest = data.partition(b"\0")
        seen["descriptor"] = descriptor + b"\0"
        seen["input"] = rest
        conn.sendall(rest)


@contextmanager
def serving(listener: socket.socket) -> Iterator[dict[str, bytes]]:
    seen: dict[str, bytes] = {}
    thread = threading.Thread(target=_echo_once, args=(listener, seen), daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        thread.join(timeout=30)
        listener.close()


def _tcp_listener() -> tuple[socket.socket, int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    return listener, listener.getsockname()[1]


def test_unix_socket_service_i1(vm1: VM) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(vm1.service_dir / "test.Sock"))
    listener.listen(1)
    with serving(listener) as seen:
        result = vm1.client(f"{vm1.user}:QUBESRPC test.Sock+arg dom0", input=b"ping\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"ping\n"
    assert seen == {"descriptor": b"test.Sock+arg dom0\0", "input": b"ping\n"}


def test_tcp_service_j1(vm1: VM) -> None:
    listener, port = _tcp_listener()
    os.symlink(f"/dev/tcp/127.0.0.1/{port}", vm1.service_dir / "test.Tcp")
    with serving(listener) as seen:
        result = vm1.client(f"{vm1.user}:QUBESRPC test.Tcp dom0", input=b"ping\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"ping\n"
    assert seen == {"descriptor": b"test.Tcp dom0\0", "input": b"ping\n"}


def test_tcp_service_port_from_argument_j2(vm1: VM) -> None:
    listener, port = _tcp_listener()
    os.symlink("/dev/tcp/127.0.0.1", vm1.service_dir / "test.Tcp2")
    with serving(listener) as seen:
        result = vm1.client(f"{vm1.user}:QUBESRPC test.Tcp2+{port} dom0", input=b"ping\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"ping\n"
    assert seen["descriptor"] == f"test.Tcp2+{port} dom0\0".encode()


def test_tcp_service_with_unexpected_argument_is_refused_j3(vm1: VM) -> None:
    listener, port = _tcp_listener()
    with listener:
        listener.settimeout(0)
        os.symlink(f"/dev/tcp/127.0.0.1/{port}", vm1.service_dir / "test.Tcp")
        result = vm1.client(f"{vm1.user}:QUBESRPC test.Tcp+arg dom0", input=b"ping\n")
        assert result.returncode == 125
        assert result.stdout == b""
        try:
            listener.accept()[0].close()
            contacted = True
        except BlockingIOError:
            contacted = False
    assert not contacted, "the TCP server was contacted"
    reasons = [e.get("reason", "") for e in vm1.agent_events("cannot run command")]
    assert "Unexpected argument arg to service /dev/tcp/127.0.0.1" in reasons


def test_tcp_service_that_refuses_the_connection(vm1: VM) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    os.symlink(f"/dev/tcp/127.0.0.1/{port}", vm1.service_dir / "test.Tcp")
    result = vm1.client(f"{vm1.user}:QUBESRPC test.Tcp dom0", input=b"ping\n")
    assert result.returncode == 125
    reasons = [e.get("reason", "") for e in vm1.agent_events("cannot run command")]
    assert any("Connection refused" in reason for reason in reasons), reasons


def test_dom0_socket_service_answers_a_vm(vm1: VM) -> None:
    """The same code on dom0's side: a VM calls a dom0 service that is a socket; the
    descriptor is dom0's form (with the requested target)."""
    host = vm1.host
    host.set_policy("test.Sock * vm1 dom0 allow\ntest.Bare * vm1 dom0 allow\n")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(host.dom0_services / "test.Sock"))
    listener.listen(1)
    with serving(listener) as seen:
        result = vm1.client_vm("dom0", "test.Sock+arg", input=b"ping\n")
    assert (result.returncode, result.stdout) == (0, b"ping\n"), result.stderr
    assert seen["descriptor"] == b"test.Sock+arg vm1 name dom0\0"
    assert seen["input"] == b"ping\n"
