"""Hostile or broken peers: each gets a clear logged error and a defined exit
code or a dropped connection, and everyone else keeps being served."""

from __future__ import annotations

import struct

import psutil
import pytest

from harness import VM, Host, is_program, wait_for
from vectors import Peer, connect_unix, listen_unix

HELLO = 0x300
EXEC_CMDLINE = 0x200
DATA_STDIN = 0x190
DATA_STDOUT = 0x191
DATA_EXIT_CODE = 0x193
TRIGGER_SERVICE3 = 0x212


def _fake_client(vm: VM, version: int = 3) -> Peer:
    peer = Peer(connect_unix(vm.host.socket_dir / f"qrexec.{vm.domid}"))
    got = peer.receive()
    assert got == (HELLO, struct.pack("<I", 3))
    peer.send(HELLO, struct.pack("<I", version))
    return peer


def _still_serves(vm: VM) -> None:
    result = vm.client(f"{vm.user}:echo still here")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"still here\n"


def _logged(events: list[dict], text: str) -> bool:
    return any(text in str(event) for event in events)


@pytest.mark.parametrize(
    ("name", "msg_type", "payload", "logged"),
    [
        ("over-long cmdline", EXEC_CMDLINE, bytes(8) + b"u:" + b"x" * 65530 + b"\0", "header.len"),
        ("unknown type", 0x777, b"", "unknown type 0x777"),
        ("type in the wrong direction", DATA_STDOUT, b"hi", "DATA_STDOUT"),
        ("trigger from a client", TRIGGER_SERVICE3, bytes(100), "TRIGGER_SERVICE3"),
        ("cmdline without its NUL", EXEC_CMDLINE, bytes(8) + b"user:true", "not NUL-terminated"),
    ],
)
def test_bad_client_message_drops_that_client_only(
    vm1: VM, name: str, msg_type: int, payload: bytes, logged: str
) -> None:
    peer = _fake_client(vm1)
    peer.send(msg_type, payload)
    peer.expect_eof()
    peer.close()
    wait_for(lambda: _logged(vm1.daemon_events("client dropped"), logged),
             what=f"the daemon to log why it dropped the client ({name})")
    _still_serves(vm1)


def test_client_hello_below_3_is_dropped(vm1: VM) -> None:
    peer = _fake_client(vm1, version=2)
    peer.expect_eof()
    wait_for(lambda: _logged(vm1.daemon_events("client dropped"), "need >= 3"),
             what="the daemon to log the old client")
    _still_serves(vm1)


def test_client_sending_data_after_its_request_is_dropped(vm1: VM) -> None:
    peer = _fake_client(vm1)
    peer.send(EXEC_CMDLINE, struct.pack("<II", 0, 0) + f"{vm1.user}:sleep 1".encode() + b"\0")
    assert peer.receive() is not None  # the port reply
    peer.sock.sendall(b"junk")
    peer.expect_eof()
    _still_serves(vm1)


def test_cmdline_without_user_part_is_125(vm1: VM) -> None:
    result = vm1.client("no-user-part")
    assert result.returncode == 125
    wait_for(lambda: _logged(vm1.agent_events("cannot run command"), "cmdline.user"),
             what="the agent to log the bad cmdline")
    _still_serves(vm1)


@pytest.mark.socket_vchan_peer
@pytest.mark.parametrize(
    ("name", "msg_type", "payload", "logged"),
    [
        ("unknown type", 0x777, b"", "unknown type 0x777"),
        ("exec request from the VM", EXEC_CMDLINE, bytes(8) + b"u:x\0", "EXEC_CMDLINE (0x200)"),
        ("v2 trigger on a v4 link", 0x210, bytes(128), "TRIGGER_SERVICE "),
        ("terminate for a bad port", 0x211, struct.pack("<II", 0, 9999), "not a data port"),
    ],
)
def test_bad_agent_drops_the_control_link_and_the_daemon_recovers(
    host: Host, name: str, msg_type: int, payload: bytes, logged: str
) -> None:
    vm, control = host.start_daemon_for_fake_agent("vm1", 42)
    agent = Peer(control)
    agent.send(HELLO, struct.pack("<I", 4))
    assert agent.receive() == (HELLO, struct.pack("<I", 4))
    agent.send(msg_type, payload)
    agent.expect_eof()
    agent.close()
    wait_for(lambda: _logged(vm.daemon_events(), logged), what=f"a log line about {name}")
    assert vm.daemon is not None and vm.daemon.poll() is None, "the daemon died"
    # A well-behaved agent comes (back): the daemon reconnects and serves.
    vm.start_agent()
    wait_for(lambda: vm.client(f"{vm.user}:echo ok", timeout=30).stdout == b"ok\n",
             timeout=30, interval=0.2, what="the daemon to serve the real agent")


@pytest.mark.socket_vchan_peer
def test_oversized_data_chunk_to_the_client_is_a_clear_error(host: Host) -> None:
    """A service side that sends more than the negotiated chunk limit."""
    vm = host.add_vm("vm1", 42)
    daemon_side = listen_unix(host.socket_dir / "qrexec.vm1")
    client = vm.start_client(f"{vm.user}:true", stdin=-3, stdout=-1, stderr=-1)  # DEVNULL, PIPE
    daemon = Peer(daemon_side.accept()[0])
    daemon.send(HELLO, struct.pack("<I", 3))
    assert daemon.receive() == (HELLO, struct.pack("<I", 3))
    request = daemon.receive()
    assert request is not None and request[0] == EXEC_CMDLINE
    daemon.send(EXEC_CMDLINE, struct.pack("<II", 42, 600))
    child = Peer(connect_unix(host.vchan_dir / "vchan.0.42.600.sock"))
    child.send(HELLO, struct.pack("<I", 4))
    assert child.receive() == (HELLO, struct.pack("<I", 4))
    child.send(DATA_STDOUT, bytes(65537))
    _, err = client.communicate(timeout=30)
    assert client.returncode == 125
    assert b"header.len" in err and b"65537" in err


@pytest.mark.socket_vchan_peer
def test_oversized_stdin_chunk_to_the_agent_ends_that_call_only(vm1: VM, host: Host) -> None:
    """A caller that sends more than the negotiated chunk limit to the agent."""
    ctl_port = 700
    # Ask the daemon for a real call, but answer it with a fake caller.
    peer = _fake_client(vm1)
    peer.send(EXEC_CMDLINE, struct.pack("<II", 0, 0) + f"{vm1.user}:exec sleep 300".encode()
              + b"\0")
    reply = peer.receive()
    assert reply is not None
    _, port = struct.unpack("<II", reply[1])
    assert port != ctl_port
    listener = listen_unix(host.vchan_dir / f"vchan.0.42.{port}.sock")
    caller = Peer(listener.accept()[0])
    listener.close()
    caller.send(HELLO, struct.pack("<I", 4))
    assert caller.receive() == (HELLO, struct.pack("<I", 4))
    wait_for(lambda: [p for p in psutil.process_iter(["name"]) if is_program(p, "sleep")
                      and p.environ().get("QTRIO_TEST_MARK") == host.mark],
             what="the service to start")
    caller.send(DATA_STDIN, bytes(65537))
    caller.expect_eof()  # the agent dropped the connection
    peer.expect_eof()  # and reported it terminated: the daemon freed the port
    wait_for(lambda: _logged(vm1.agent_events("connection failed"), "65537"),
             what="the agent to log the oversized chunk")
    wait_for(lambda: not [p for p in psutil.process_iter(["name"]) if is_program(p, "sleep")
                          and p.environ().get("QTRIO_TEST_MARK") == host.mark],
             what="the service to be killed")
    _still_serves(vm1)


@pytest.mark.socket_vchan_peer
def test_agent_drops_bad_daemon_and_offers_the_control_vchan_again(host: Host) -> None:
    vm = host.add_vm("vm1", 42)
    vm.start_agent()
    ctl = Peer(connect_unix(host.vchan_dir / "vchan.42.0.512.sock"))
    assert ctl.receive() == (HELLO, struct.pack("<I", 4))
    ctl.send(HELLO, struct.pack("<I", 4))
    ctl.send(0x191, b"not from a daemon")
    ctl.expect_eof()
    wait_for(lambda: _logged(vm.agent_events("control link dropped"), "DATA_STDOUT"),
             what="the agent to log the bad message")
    vm.start_daemon()
    assert vm.client(f"{vm.user}:echo ok").stdout == b"ok\n"
