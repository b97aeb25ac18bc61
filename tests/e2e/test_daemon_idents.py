"""How the daemon tracks a VM's requests: by ident until answered, by count until done.

A VM request's ident is the daemon's only until it answered the request.

An agent's ident comes from fd numbers (``SOCKET<fd>``, or three of them in
R2), and the next client gets the same fds as soon as the old socket closed,
while dom0 may still be running the old call. Once the daemon sent
SERVICE_CONNECT or SERVICE_REFUSED the ident names nothing pending, so a new
request may carry it; the old call goes on, and still counts toward the
per-VM call limit, which lets a few hundred calls of one VM run at once.

The test plays vm1's agent (and its callers' data vchans); the service is
dom0's, so no other VM is needed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from harness import Host, wait_for
from qrexec_trio.protocol import MAX_DATA_PORTS
from vectors import Peer

from .test_dom0_glue import (
    DATA_EXIT_CODE,
    DATA_STDERR,
    DATA_STDIN,
    DATA_STDOUT,
    HELLO,
    SERVICE_CONNECT,
    FakeSourceAgent,
    receive_until_exit_code,
)

pytestmark = pytest.mark.socket_vchan_peer

IDENT = b"SOCKET13"
TOO_MANY_CALLS = "request refused: too many calls from this VM at once (--max-calls)"
#: Says which call it is, then echoes its stdin until EOF.
ECHO = '#!/bin/sh\necho "call $1"\nexec cat\n'


@pytest.fixture
def dom0_echo(host: Host) -> None:
    service = host.dom0_services / "test.Echo"
    service.write_text(ECHO)
    service.chmod(0o755)
    host.set_policy("test.Echo * vm1 dom0 allow\n")


def _start_call(vm1: FakeSourceAgent, argument: str, ident: bytes = IDENT) -> tuple[int, Peer]:
    """Trigger test.Echo+ARGUMENT in dom0 and open its data vchan: a call that is running."""
    vm1.trigger("dom0", f"test.Echo+{argument}", ident)
    port = vm1.expect_connect(ident)
    listener = vm1.offer_data_vchan(port)
    data = Peer(listener.accept()[0])
    listener.close()
    data.send(HELLO, struct.pack("<I", 4))
    assert data.receive() == (HELLO, struct.pack("<I", 4))
    # dom0's service end sends an empty STDERR first (as the reference's does).
    assert data.receive() == (DATA_STDERR, b"")
    assert data.receive() == (DATA_STDOUT, f"call {argument}\n".encode())
    return port, data


def _finish_call(vm1: FakeSourceAgent, port: int, data: Peer, stdin: bytes) -> None:
    data.send(DATA_STDIN, stdin)
    data.send(DATA_STDIN, b"")
    got = receive_until_exit_code(data)
    data.close()
    vm1.control.send(0x211, struct.pack("<II", 0, port))  # CONNECTION_TERMINATED
    assert b"".join(p for t, p in got if t == DATA_STDOUT) == stdin
    assert got[-1] == (DATA_EXIT_CODE, struct.pack("<i", 0))


@pytest.fixture
def vm1(host: Host, dom0_echo: None) -> Iterator[FakeSourceAgent]:
    fake = FakeSourceAgent(host)
    yield fake
    assert fake.vm.daemon is not None and fake.vm.daemon.poll() is None, "the daemon died"


def test_ident_of_an_answered_call_that_still_runs_can_be_used_again(
    vm1: FakeSourceAgent,
) -> None:
    first_port, first = _start_call(vm1, "first")
    second_port, second = _start_call(vm1, "second")  # the same ident, the first still runs
    assert second_port != first_port
    _finish_call(vm1, second_port, second, b"to the second\n")
    # The first call was not disturbed by the second one under its ident.
    _finish_call(vm1, first_port, first, b"to the first\n")
    assert not vm1.vm.daemon_events("request refused: its id is already in use")


def test_ident_of_a_refused_request_can_be_used_again(vm1: FakeSourceAgent) -> None:
    vm1.trigger("dom0", "test.Denied", IDENT)  # no rule: denied
    vm1.expect_refused(IDENT)
    port, data = _start_call(vm1, "after")
    _finish_call(vm1, port, data, b"x\n")


def test_answered_calls_still_count_toward_the_call_limit(host: Host, dom0_echo: None) -> None:
    vm1 = FakeSourceAgent(host, "--max-calls", "1")
    port, data = _start_call(vm1, "first")
    # Its ident is free again, but the call still runs: the VM is at its limit.
    vm1.trigger("dom0", "test.Echo+second", IDENT)
    vm1.expect_refused(IDENT)
    vm1.trigger("dom0", "test.Echo+third", b"SOCKET14")
    vm1.expect_refused(b"SOCKET14")
    refusals = wait_for(lambda: len(vm1.vm.daemon_events(TOO_MANY_CALLS)) == 2
                        and vm1.vm.daemon_events(TOO_MANY_CALLS),
                        what="the two refusals to be logged")
    assert [(e["calls"], e["limit"]) for e in refusals] == [(1, 1), (1, 1)]
    _finish_call(vm1, port, data, b"x\n")
    # Once the call ended, there is room again.
    wait_for(lambda: vm1.vm.daemon_events("request ended"), what="the first call to end")
    port, data = _start_call(vm1, "fourth")
    _finish_call(vm1, port, data, b"y\n")


def test_default_call_limit_fits_256_calls_below_the_data_ports() -> None:
    from qrexec_trio.roles.daemon import build_parser

    limit = build_parser().parse_args(["42", "vm1"]).max_calls
    assert 256 < limit < MAX_DATA_PORTS
    assert build_parser().parse_args(["--max-calls", "3", "42", "vm1"]).max_calls == 3


def test_300_calls_of_one_vm_at_once_are_all_answered(vm1: FakeSourceAgent) -> None:
    """Each gets its own port; none is refused (the calls then wait for their data vchans)."""
    idents = [f"SOCKET{i}".encode() for i in range(300)]
    for ident in idents:
        vm1.trigger("dom0", "test.Echo", ident)
    # The requests are decided concurrently: the answers come in any order.
    answers = [vm1.control.receive() for _ in idents]
    assert all(a is not None and a[0] == SERVICE_CONNECT for a in answers), [
        a for a in answers if a is None or a[0] != SERVICE_CONNECT][:3]
    answered = {a[1][8:].rstrip(b"\0"): struct.unpack("<II", a[1][:8]) for a in answers if a}
    assert sorted(answered) == sorted(idents)
    ports = {port for domain, port in answered.values() if domain == 0}
    assert len(ports) == len(idents)
    assert min(ports) == 513 and max(ports) < 513 + MAX_DATA_PORTS
