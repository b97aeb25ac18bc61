"""The daemon's client socket, byte for byte: every request form the reference
qrexec-daemon (4.4, handle_cmdline_body_from_client) accepts, and what it does
with broken clients.

The test plays the VM's agent on the control vchan (over the socket backend's
wire) and the clients on ``qrexec.42``, so every byte the daemon sends either
way is checked. A port that must have been freed shows as the first data
port, 513, handed out again.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from harness import Host, is_program, marked_processes, wait_for
from vectors import Peer, connect_unix

from .test_dom0_glue import FakeSourceAgent

pytestmark = pytest.mark.socket_vchan_peer

HELLO = 0x300
EXEC_CMDLINE, JUST_EXEC, SERVICE_CONNECT, SERVICE_REFUSED = 0x200, 0x201, 0x202, 0x203
CONNECTION_TERMINATED = 0x211
DOMID = 42
#: The daemon's deadline for a client's request, short so that a silent client
#: is dropped quickly (the clients here send theirs at once).
CLIENT_REQUEST_TIMEOUT = 3


def ports(domain: int, port: int) -> bytes:
    """exec_params without a command line: {connect_domain, connect_port}."""
    return struct.pack("<II", domain, port)


def padded(ident: bytes) -> bytes:
    return ident.ljust(32, b"\0")


@pytest.fixture
def agent(host: Host, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSourceAgent]:
    """vm1's real daemon with the test as its agent.

    Its policy program never answers (as in test_dom0_glue's ``-c`` test), so
    every trigger stays pending until a client answers it on the socket.
    """
    policy = host.root / "policy-exec"
    policy.write_text("#!/bin/sh\nexec sleep 60\n")
    policy.chmod(0o755)
    env = host.env
    with monkeypatch.context() as patch:
        # Host.env takes no extra variables for the daemon: add the deadline.
        patch.setattr(host, "env", lambda domid, **extra: env(
            domid, QREXEC_TIMEOUT_CLIENT_REQUEST=str(CLIENT_REQUEST_TIMEOUT), **extra))
        fake = FakeSourceAgent(host, "--policy-exec", str(policy))
    yield fake
    assert fake.vm.daemon is not None and fake.vm.daemon.poll() is None, "the daemon died"


def open_client(host: Host, *, hello: bool = True) -> Peer:
    """A client of qrexec.42 past the HELLO exchange (or only past the daemon's HELLO)."""
    peer = Peer(connect_unix(host.socket_dir / f"qrexec.{DOMID}"))
    # The daemon speaks first: HELLO, version 3.
    assert peer.receive_raw(12) == bytes.fromhex("00030000" "04000000" "03000000")
    if hello:
        peer.send(HELLO, struct.pack("<I", 3))
    return peer


def make_pending(agent: FakeSourceAgent, *idents: bytes) -> None:
    for ident in idents:
        agent.trigger("vm2", "test.Echo", ident)
    wait_for(lambda: len([p for p in marked_processes(agent.host.mark)
                          if is_program(p, "sleep")]) == len(idents),
             what="the requests to be pending (their policy programs running)")


def terminate(agent: FakeSourceAgent, domain: int, port: int) -> None:
    """The agent reports the data vchan done with: the daemon frees the port."""
    agent.control.send(CONNECTION_TERMINATED, ports(domain, port))


def expect_open(peer: Peer) -> None:
    """Neither a reply nor EOF: the daemon holds the client in RUNNING state."""
    timeout, peer.timeout = peer.timeout, 1.0
    try:
        with pytest.raises(TimeoutError):
            peer.receive()
    finally:
        peer.timeout = timeout


def logged(agent: FakeSourceAgent, event: str, text: str = "") -> bool:
    return any(text in str(e) for e in agent.vm.daemon_events(event))


def still_serves_from_the_first_port(agent: FakeSourceAgent) -> None:
    """A normal call: served, on port 513 (no port leaked), nothing else to the agent."""
    user = agent.vm.user.encode()
    client = open_client(agent.host)
    client.send(EXEC_CMDLINE, ports(0, 0) + user + b":true\0")
    assert client.receive() == (EXEC_CMDLINE, ports(DOMID, 513))
    # The very next message on the control link: whatever the bad client sent
    # before, none of it reached the agent.
    assert agent.control.receive() == (EXEC_CMDLINE, ports(0, 513) + user + b":true\0")
    terminate(agent, 0, 513)
    client.expect_eof()  # the daemon closes it when the port is freed
    client.close()


# -- every form the reference accepts -------------------------------------------------------


def test_every_client_request_form_is_answered_as_the_reference_does(
    agent: FakeSourceAgent, host: Host
) -> None:
    user = agent.vm.user.encode()
    ctl = agent.control

    # EXEC_CMDLINE for dom0 (connect_domain 0): a reply with the VM's domid and
    # the port, then the request to the agent with DEFAULT: substituted.
    client = open_client(host)
    client.send(EXEC_CMDLINE, ports(0, 0) + b"DEFAULT:echo hi\0")
    assert client.receive() == (EXEC_CMDLINE, ports(DOMID, 513))
    assert ctl.receive() == (EXEC_CMDLINE, ports(0, 513) + user + b":echo hi\0")
    expect_open(client)
    terminate(agent, 0, 513)
    client.expect_eof()

    # JUST_EXEC for another VM (domid 43 > 42: odd slots, so port 514).
    client = open_client(host)
    client.send(JUST_EXEC, ports(43, 0) + user + b":true\0")
    assert client.receive() == (JUST_EXEC, ports(DOMID, 514))
    assert ctl.receive() == (JUST_EXEC, ports(43, 514) + user + b":true\0")
    terminate(agent, 43, 514)
    client.expect_eof()

    make_pending(agent, b"REQ1", b"REQ2", b"REQ3", b"REQ4")

    # SERVICE_CONNECT, port 0, long form (8 + 32 bytes): dom0 serves the call.
    client = open_client(host)
    client.send(SERVICE_CONNECT, ports(0, 0) + padded(b"REQ1"))
    assert client.receive() == (SERVICE_CONNECT, ports(DOMID, 513))
    assert ctl.receive() == (SERVICE_CONNECT, ports(0, 513) + padded(b"REQ1"))
    expect_open(client)
    terminate(agent, 0, 513)
    client.expect_eof()

    # The short form (8 + the id and one NUL): the same answer, and the agent
    # still gets the 40-byte form.
    client = open_client(host)
    short = ports(0, 0) + b"REQ2\0"
    assert len(short) == 13
    client.send(SERVICE_CONNECT, short)
    assert client.receive() == (SERVICE_CONNECT, ports(DOMID, 513))
    assert ctl.receive() == (SERVICE_CONNECT, ports(0, 513) + padded(b"REQ2"))
    terminate(agent, 0, 513)
    client.expect_eof()

    # A VM-to-VM answer (a port the target's daemon allocated), long form:
    # passed on as it is, no reply, and the socket stays open...
    client = open_client(host)
    client.send(SERVICE_CONNECT, ports(43, 514) + padded(b"REQ3"))
    assert ctl.receive() == (SERVICE_CONNECT, ports(43, 514) + padded(b"REQ3"))
    expect_open(client)
    # ...until the client sends anything (an error) or closes.
    client.sock.sendall(b"x")
    client.expect_eof()
    wait_for(lambda: logged(agent, "client sent data after its request; closing it"),
             what="the daemon to log the data after the request")

    # The same, short form with bytes after the NUL (never looked at): the
    # agent gets the 40-byte form.
    client = open_client(host)
    client.send(SERVICE_CONNECT, ports(43, 516) + b"REQ4\0junk\0")
    assert ctl.receive() == (SERVICE_CONNECT, ports(43, 516) + padded(b"REQ4"))
    expect_open(client)
    client.close()

    # Each request is answered once: a second answer is dropped, nothing sent.
    for again in (ports(0, 0) + padded(b"REQ1"), ports(43, 518) + b"REQ4\0"):
        client = open_client(host)
        client.send(SERVICE_CONNECT, again)
        client.expect_eof()
    wait_for(lambda: len(agent.vm.daemon_events(
        "SERVICE_CONNECT for a request that is not pending")) == 2,
        what="the daemon to log both answers to answered requests")
    # Nothing else went to the agent: the next control message is the next call's.
    still_serves_from_the_first_port(agent)


# -- broken clients: each dropped with a reason, and everyone else served ---------------------


def _garbage_instead_of_hello(peer: Peer) -> None:
    peer.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")


def _hello_of_the_wrong_length(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<II", 3, 0))


def _hello_of_version_4(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 4))


def _truncated_frame_then_eof(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.sock.sendall(struct.pack("<II", EXEC_CMDLINE, 30) + ports(0, 0) + b"us")
    peer.sock.shutdown(socket.SHUT_WR)


def _truncated_header_then_eof(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.sock.sendall(struct.pack("<II", EXEC_CMDLINE, 30)[:5])
    peer.sock.shutdown(socket.SHUT_WR)


def _second_hello(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.send(HELLO, struct.pack("<I", 3))


def _refusal_from_a_client(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.send(SERVICE_REFUSED, padded(b"REQ1"))


def _exec_params_alone(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.send(EXEC_CMDLINE, ports(0, 0))


def _over_65535(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.sock.sendall(struct.pack("<II", SERVICE_CONNECT, 65536))


def _id_without_its_nul(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.send(SERVICE_CONNECT, ports(0, 0) + b"REQ1")


def _cmdline_with_a_nul_inside(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.send(EXEC_CMDLINE, ports(0, 0) + b"root:true\0rm -rf /\0")


def _id_longer_than_31(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.send(SERVICE_CONNECT, ports(0, 0) + b"REQ1" * 10 + b"\0")


def _unknown_id(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.send(SERVICE_CONNECT, ports(0, 0) + padded(b"NEVER-ASKED"))


def _unknown_id_with_a_port(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.send(SERVICE_CONNECT, ports(43, 514) + b"NEVER-ASKED\0")


def _port_that_is_no_data_port(peer: Peer) -> None:
    peer.send(HELLO, struct.pack("<I", 3))
    peer.send(SERVICE_CONNECT, ports(43, 9999) + padded(b"REQ1"))


BAD_CLIENTS: list[tuple[Callable[[Peer], None], str, str]] = [
    (_garbage_instead_of_hello, "client dropped", "expected MSG_HELLO first"),
    (_hello_of_the_wrong_length, "client dropped", "MSG_HELLO must carry 4 bytes"),
    (_hello_of_version_4, "client dropped", "need exactly 3"),
    (_truncated_frame_then_eof, "client dropped", "stream ended after 10 of 30 bytes"),
    (_truncated_header_then_eof, "client dropped", "stream ended inside a message header"),
    (_second_hello, "client dropped", "MSG_HELLO not allowed here"),
    (_refusal_from_a_client, "client dropped", "SERVICE_REFUSED (0x203) may not be sent"),
    (_exec_params_alone, "client dropped", "length 8 outside 9..65535"),
    (_over_65535, "client dropped", "length 65536 outside 9..65535"),
    (_id_without_its_nul, "client dropped", "service_params: not NUL-terminated"),
    (_cmdline_with_a_nul_inside, "client dropped", "contains a NUL byte before its end"),
    (_id_longer_than_31, "SERVICE_CONNECT for a request that is not pending",
     "longer than 31 bytes"),
    (_unknown_id, "SERVICE_CONNECT for a request that is not pending", "NEVER-ASKED"),
    (_unknown_id_with_a_port, "SERVICE_CONNECT for a request that is not pending",
     "NEVER-ASKED"),
    (_port_that_is_no_data_port, "client dropped", "port 9999, not a data port"),
]


@pytest.mark.parametrize(("send", "event", "text"), BAD_CLIENTS,
                         ids=[case[0].__name__.strip("_") for case in BAD_CLIENTS])
def test_bad_client_is_dropped_with_a_reason(
    agent: FakeSourceAgent, host: Host, send: Callable[[Peer], None], event: str, text: str
) -> None:
    make_pending(agent, b"REQ1")
    peer = open_client(host, hello=False)
    send(peer)
    peer.expect_eof()
    peer.close()
    wait_for(lambda: logged(agent, event, text), what=f"the daemon to log {event!r} ({text})")
    still_serves_from_the_first_port(agent)
    # The request the bad client named is still pending: a good answer takes it.
    client = open_client(host)
    client.send(SERVICE_CONNECT, ports(0, 0) + b"REQ1\0")
    assert client.receive() == (SERVICE_CONNECT, ports(DOMID, 513))
    assert agent.control.receive() == (SERVICE_CONNECT, ports(0, 513) + padded(b"REQ1"))
    terminate(agent, 0, 513)
    client.expect_eof()


@pytest.mark.parametrize("hello", [False, True], ids=["before-hello", "after-hello"])
def test_silent_client_is_dropped_after_the_request_timeout(
    agent: FakeSourceAgent, host: Host, hello: bool
) -> None:
    silent = open_client(host, hello=hello)
    # Others are served meanwhile.
    still_serves_from_the_first_port(agent)
    silent.expect_eof()  # within the Peer's 20 s; the deadline is CLIENT_REQUEST_TIMEOUT
    wait_for(lambda: logged(agent, "client dropped",
                            f"waited {CLIENT_REQUEST_TIMEOUT}s for a request"),
             what="the daemon to log the silent client")
    silent.close()
    still_serves_from_the_first_port(agent)


@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_client_that_leaves_right_after_its_request(
    agent: FakeSourceAgent, host: Host, how: str
) -> None:
    """The request is whole: its port is the agent's to report done, as in the
    reference; unless the reply could not even be sent, then it is freed at once."""
    user = agent.vm.user.encode()
    client = open_client(host)
    client.send(EXEC_CMDLINE, ports(0, 0) + user + b":true\0")
    if how == "close":
        client.close()
    else:
        client.sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: logged(agent, "request forwarded")
             or logged(agent, "request not forwarded; port freed"),
             what="the daemon to forward the request or free its port")
    if logged(agent, "request forwarded"):
        assert agent.control.receive() == (EXEC_CMDLINE, ports(0, 513) + user + b":true\0")
        terminate(agent, 0, 513)
        wait_for(lambda: logged(agent, "port released"), what="the port to be released")
    if how == "shutdown":
        assert client.receive() == (EXEC_CMDLINE, ports(DOMID, 513))
        client.expect_eof()
        client.close()
    still_serves_from_the_first_port(agent)
