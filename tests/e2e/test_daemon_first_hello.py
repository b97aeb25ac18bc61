"""The daemon's first HELLO goes through the same retry path as later ones.

An agent that botches the first HELLO exchange (a bad version, a HELLO of the
wrong length, another message first, or a close right after its HELLO) is
logged and the daemon tries again, as it does when the agent reconnects; the
good agent that comes next is served. Only the start-up timeout ends a daemon
whose agent never gets it right (exit 3, naming the last error).

The test plays the faulty agent on the control vchan over the socket
backend's wire.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import VM, Host, program, read_log, wait_for
from vectors import Peer, listen_unix

pytestmark = pytest.mark.socket_vchan_peer

HELLO = 0x300
CONNECTION_TERMINATED = 0x211
DOMID = 42
RETRIED = "agent connection failed; retrying"


def _hello_of_version_1(agent: Peer) -> None:
    agent.send(HELLO, struct.pack("<I", 1))


def _hello_of_3_bytes(agent: Peer) -> None:
    agent.send(HELLO, struct.pack("<I", 4)[:3])


def _hello_of_8_bytes(agent: Peer) -> None:
    agent.send(HELLO, struct.pack("<II", 4, 0))


def _terminate_before_hello(agent: Peer) -> None:
    agent.send(CONNECTION_TERMINATED, struct.pack("<II", 0, 513))


#: Each fault, and what the daemon's log line about it says.
BAD_HELLOS: list[tuple[Callable[[Peer], None], str]] = [
    (_hello_of_version_1, "need >= 2"),
    (_hello_of_3_bytes, "MSG_HELLO must carry 4 bytes"),
    (_hello_of_8_bytes, "MSG_HELLO must carry 4 bytes"),
    (_terminate_before_hello, "expected MSG_HELLO first"),
]


def _control_vchan(host: Host) -> Path:
    """Where the agent offers the control vchan (the daemon is its client)."""
    return host.vchan_dir / f"vchan.{DOMID}.0.512.sock"


def _first_connection(host: Host, vm: VM) -> Peer:
    """Start ``vm``'s daemon and take its first connection to the control vchan.

    The offer is withdrawn at once, so the daemon's next attempt waits for
    whoever offers next (the real agent).
    """
    path = _control_vchan(host)
    listener = listen_unix(path)
    try:
        vm.start_daemon(wait=False)
        connection, _ = listener.accept()
    finally:
        listener.close()
        path.unlink()
    return Peer(connection)


def _serves_the_good_agent_that_comes_next(vm: VM) -> None:
    assert vm.daemon is not None
    vm.start_agent()
    wait_for(lambda: (vm.host.socket_dir / f"qrexec.{DOMID}").exists()
             or vm.daemon.poll() is not None, timeout=30, what="the daemon to serve clients")
    assert vm.daemon.poll() is None, vm.daemon_log.read_text()[-3000:]
    result = vm.client(f"{vm.user}:echo ok", timeout=30)
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr


@pytest.mark.parametrize(("fault", "logged"), BAD_HELLOS,
                         ids=[fault.__name__.strip("_") for fault, _ in BAD_HELLOS])
def test_bad_first_hello_is_retried(
    host: Host, fault: Callable[[Peer], None], logged: str
) -> None:
    vm = host.add_vm("vm1", DOMID)
    agent = _first_connection(host, vm)
    fault(agent)
    agent.expect_eof()  # the daemon dropped this attempt
    agent.close()
    assert vm.daemon is not None

    def retried() -> bool:
        return any(logged in str(event) for event in vm.daemon_events(RETRIED))

    wait_for(lambda: retried() or vm.daemon.poll() is not None,
             what="the daemon to log the bad HELLO and retry")
    assert vm.daemon.poll() is None, vm.daemon_log.read_text()[-3000:]
    assert retried()
    _serves_the_good_agent_that_comes_next(vm)


def test_agent_closing_right_after_its_first_hello_is_retried(host: Host) -> None:
    vm = host.add_vm("vm1", DOMID)
    agent = _first_connection(host, vm)
    agent.send(HELLO, struct.pack("<I", 4))
    agent.close()
    _serves_the_good_agent_that_comes_next(vm)


@pytest.fixture
def startup_timeout(host: Host, monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    """The daemons' start-up timeout, short: these daemons are meant to give up."""
    seconds = 3.0
    env = host.env
    monkeypatch.setattr(host, "env", lambda domid, **extra: env(
        domid, QREXEC_STARTUP_TIMEOUT=str(seconds), **extra))
    yield seconds


def _direct_daemon(host: Host, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [program("qrexec-daemon"), "--direct", "--socket-dir", str(host.socket_dir),
             "--policy-d", str(host.policy_d), "--qubesd-internal-socket", "",
             "--log-level", "debug", str(DOMID), "vm1", "user"],
            env=host.env(0), stdout=out, stderr=out, stdin=subprocess.DEVNULL)


@pytest.fixture
def always_bad_agent(host: Host) -> Iterator[None]:
    """An agent that answers every connection with a version 1 HELLO, then closes."""
    listener = listen_unix(_control_vchan(host))
    listener.settimeout(None)  # shutdown() below ends the accept

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # shut down: done
                return
            with connection:
                _hello_of_version_1(Peer(connection))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(30)


def _daemon_timed_out(host: Host, startup_timeout: float) -> tuple[dict[str, Any], Path]:
    """Run a daemon whose agent never gets through: it exits 3 at the start-up
    timeout; its one "agent did not connect" log event, and its log."""
    log = host.root / "daemon.log"
    daemon = _direct_daemon(host, log)
    assert daemon.wait(timeout=startup_timeout + 30) == 3
    (timed_out,) = [e for e in read_log(log) if e.get("event") == "agent did not connect"]
    return timed_out, log


@pytest.mark.usefixtures("always_bad_agent")
def test_agent_that_never_says_a_good_hello_ends_the_daemon_at_the_startup_timeout(
    host: Host, startup_timeout: float
) -> None:
    timed_out, log = _daemon_timed_out(host, startup_timeout)
    assert "need >= 2" in timed_out["error"]
    assert len([e for e in read_log(log) if e.get("event") == RETRIED]) >= 1
    assert not (host.socket_dir / f"qrexec.{DOMID}").exists()


def test_agent_that_never_shows_up_ends_the_daemon_at_the_startup_timeout(
    host: Host, startup_timeout: float
) -> None:
    timed_out, _ = _daemon_timed_out(host, startup_timeout)
    assert f"within {startup_timeout:g}s" in timed_out["error"]
