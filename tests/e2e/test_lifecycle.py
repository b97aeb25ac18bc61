"""The long-lived programs under a service manager: sd_notify, graceful stop, reload.

The test plays systemd's notify socket (a datagram socket bound in the test's
directory, named by ``NOTIFY_SOCKET``, with ``WATCHDOG_USEC`` set) for the
agent, the daemon and the policy daemon, and holds calls across their
SIGTERM and SIGHUP.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from harness import VM, Host, marked_processes, wait_for

from .test_policy_daemon import ALLOW_VM2, c_request, start_policy_daemon

#: Signals whose default action ends a process quietly: none may end a
#: long-lived program (named here, not taken from the code under test).
QUIET_ENDS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM,
              signal.SIGPROF, signal.SIGIO, signal.SIGPWR, signal.SIGSTKFLT,
              signal.SIGRTMIN, signal.SIGRTMIN + 5, signal.SIGRTMAX)
#: systemd's watchdog timeout for the programs: a ping every 0.5 s. Not
#: faster: a unix datagram queue holds only net.unix.max_dgram_qlen (10 here)
#: messages, and pings queued while a test reads the other socket would crowd
#: out the messages it waits for (a dropped STATUS is sent again at the next
#: tick; a dropped STOPPING=1 is not).
WATCHDOG_USEC = "1000000"
#: A call that says it started, then holds until its caller sends a line.
HOLD = 'echo start; read x; echo "got $x"; exit 3'


@dataclass
class NotifySocket:
    """systemd's end of ``NOTIFY_SOCKET``: every datagram a program sent, in order."""

    path: Path
    sock: socket.socket = field(init=False)
    messages: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(30)

    def until(self, done: Callable[[list[str]], bool], what: str) -> None:
        """Receive until ``done(messages)``; fails after 30 s (watchdog pings
        keep coming, so silence alone would never end the wait)."""
        deadline = time.monotonic() + 30
        while not done(self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.path.name}: no {what}; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                raise AssertionError(f"{self.path.name}: no {what}; got {self.messages}") from None

    def drain(self) -> None:
        """Read what is queued, so that the queue has room for what comes next."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(30)

    def until_message(self, prefix: str) -> None:
        start = len(self.messages)
        self.until(lambda got: any(m.startswith(prefix) for m in got[start:]), prefix)

    def pings_since(self, start: int) -> int:
        return self.messages[start:].count("WATCHDOG=1")

    def without_pings(self) -> list[str]:
        return [m for m in self.messages if m != "WATCHDOG=1"]

    def close(self) -> None:
        self.sock.close()


#: A grace no test waits for: the harness's own default is 0 (stop at once).
LONG_GRACE = "60"


def notified_env(host: Host, monkeypatch: pytest.MonkeyPatch,
                 sockets: dict[int, NotifySocket], **more: str) -> None:
    """Programs the harness starts for domain D get ``sockets[D]`` as their NOTIFY_SOCKET."""
    env = host.env

    def with_notify(domid: int, **extra: str) -> dict[str, str]:
        if domid in sockets:
            extra = {"NOTIFY_SOCKET": str(sockets[domid].path),
                     "WATCHDOG_USEC": WATCHDOG_USEC, **more, **extra}
        return env(domid, **extra)

    monkeypatch.setattr(host, "env", with_notify)


@pytest.fixture
def notify(host: Host) -> Iterator[Callable[[str], NotifySocket]]:
    made: list[NotifySocket] = []

    def make(name: str) -> NotifySocket:
        made.append(NotifySocket(host.root / f"notify-{name}"))
        return made[-1]

    yield make
    for sock in made:
        sock.close()


def check_lifecycle(proc: subprocess.Popen[bytes], notify: NotifySocket, name: str) -> None:
    """READY, STATUS, pings; SIGHUP: RELOADING ... READY; SIGTERM: STOPPING, exit 0."""
    notify.until(lambda got: "READY=1" in got, "READY=1")
    ready_at = len(notify.messages)
    notify.until(lambda got: notify.pings_since(ready_at) >= 3
                 and any(m.startswith("STATUS=") for m in got), "STATUS= and 3 pings")
    proc.send_signal(signal.SIGHUP)
    notify.until_message("RELOADING=1")
    notify.until_message("READY=1")
    reloaded_at = len(notify.messages)
    notify.until(lambda got: notify.pings_since(reloaded_at) >= 2, "pings after the reload")
    proc.send_signal(signal.SIGTERM)
    notify.until_message("STOPPING=1")
    assert proc.wait(timeout=30) == 0
    sequence = notify.without_pings()
    print(f"{name}: {sequence}")  # what the report quotes (pytest -s)
    kinds = [m.split("\n")[0].split("=")[0] for m in sequence]
    assert kinds == ["READY", "STATUS", "RELOADING", "READY", "STATUS", "STOPPING"], sequence
    assert sequence[1].startswith("STATUS=serving; 0 live connections")
    reloading = sequence[2].split("\n")
    assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1].split("=")[1]) > 0
    assert sequence[5].startswith("STOPPING=1\nSTATUS=stopping")
    # The first ping comes with READY, not before it.
    assert notify.messages[0] == "READY=1"


def test_agent_and_daemon_notify_systemd(host: Host, monkeypatch: pytest.MonkeyPatch,
                                         notify: Callable[[str], NotifySocket]) -> None:
    agent_notify, daemon_notify = notify("agent"), notify("daemon")
    notified_env(host, monkeypatch, {42: agent_notify, 0: daemon_notify})
    vm = host.start_vm("vm1", 42)
    assert vm.agent is not None and vm.daemon is not None
    check_lifecycle(vm.daemon, daemon_notify, "qrexec-daemon")
    check_lifecycle(vm.agent, agent_notify, "qrexec-agent")
    (reloaded,) = vm.agent_events("reloaded")
    assert "caches no configuration" in reloaded["what"]
    (reloaded,) = vm.daemon_events("reloaded")
    assert reloaded["what"] == "policy (0 rules)"


def test_policy_daemon_notifies_systemd(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    env = host.env
    monkeypatch.setattr(host, "env", lambda domid, **extra: env(
        domid, WATCHDOG_USEC=WATCHDOG_USEC, **extra))
    daemon = start_policy_daemon(host)  # it has read READY=1
    notify = NotifySocket.__new__(NotifySocket)
    notify.path, notify.sock, notify.messages = Path(), daemon.notify, ["READY=1"]
    try:
        check_lifecycle(daemon.proc, notify, "qrexec-policy-daemon")
    finally:
        daemon.notify.close()


def test_bad_watchdog_and_missing_notify_socket(host: Host,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad values from the unit: a log line each, and the programs run as usual."""
    env = host.env
    monkeypatch.setattr(host, "env", lambda domid, **extra: env(
        domid, NOTIFY_SOCKET=str(host.root / "nobody-here"), WATCHDOG_USEC="soon", **extra))
    vm = host.start_vm("vm1", 42)
    result = vm.client(f"{vm.user}:echo ok")
    assert result.returncode == 0 and result.stdout == b"ok\n", result.stderr
    for events in (vm.agent_events, vm.daemon_events):
        assert len(events("watchdog disabled")) == 1
        assert len(events("cannot notify systemd; notifications dropped")) == 1


# -- graceful stop -----------------------------------------------------------------------

def hold(vm: VM) -> subprocess.Popen[bytes]:
    """A dom0 call into ``vm`` that runs until it is sent a line."""
    call = vm.start_client(f"{vm.user}:{HOLD}", stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert call.stdout is not None
    assert call.stdout.readline() == b"start\n"
    return call


def release(call: subprocess.Popen[bytes]) -> tuple[bytes, int]:
    out, _ = call.communicate(b"go\n", timeout=60)
    return b"start\n" + out, call.returncode  # hold() read the first line


def test_a_call_finishes_across_sigterm(host: Host, monkeypatch: pytest.MonkeyPatch,
                                        notify: Callable[[str], NotifySocket]) -> None:
    agent_notify, daemon_notify = notify("agent"), notify("daemon")
    notified_env(host, monkeypatch, {42: agent_notify, 0: daemon_notify},
                 QREXEC_TIMEOUT_STOP_GRACE=LONG_GRACE)
    vm = host.start_vm("vm1", 42)
    assert vm.agent is not None and vm.daemon is not None
    call = hold(vm)
    # The live call is counted in the status each program reports.
    for sock in (agent_notify, daemon_notify):
        sock.until_message("STATUS=serving; 1 live connection (1 running)")
    for sock in (agent_notify, daemon_notify):
        sock.drain()
    for proc in (vm.daemon, vm.agent):
        proc.send_signal(signal.SIGTERM)
    wait_for(lambda: vm.agent_events("stopping; live connections may finish")
             and vm.daemon_events("stopping; live connections may finish"),
             what="both programs stopping")
    assert vm.daemon.poll() is None and vm.agent.poll() is None
    for sock in (agent_notify, daemon_notify):
        sock.until_message("STOPPING=1\nSTATUS=stopping; 1 live connection (1 running)")
    # A new call is refused meanwhile (at once: not left waiting past the grace).
    refused = vm.client(f"{vm.user}:echo new", timeout=60)
    assert refused.returncode != 0 and refused.stdout == b""
    assert release(call) == (b"start\ngot go\n", 3)
    assert vm.agent.wait(timeout=30) == 0
    assert vm.daemon.wait(timeout=30) == 0
    assert not any(p.exists() for p in (host.socket_dir / "qrexec.42", host.socket_dir /
                                        "qrexec.vm1", vm.runtime_dir / "qrexec-agent"))


def test_a_stopping_agent_refuses_new_calls_with_a_status(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    env = host.env
    monkeypatch.setattr(host, "env", lambda domid, **extra: env(
        domid, QREXEC_TIMEOUT_STOP_GRACE=LONG_GRACE, **extra))
    vm = host.start_vm("vm1", 42)
    assert vm.agent is not None
    call = hold(vm)
    vm.agent.send_signal(signal.SIGTERM)
    wait_for(lambda: vm.agent_events("stopping; live connections may finish"),
             what="the agent stopping")
    refused = vm.client(f"{vm.user}:echo new", timeout=60)
    assert (refused.returncode, refused.stdout) == (125, b"")
    assert vm.agent_events("agent stopping; call refused")
    # The VM's own new calls too: refused at once, not left to the grace's end.
    own = vm.client_vm("dom0", "test.Anything", timeout=60)
    assert own.returncode != 0 and own.stdout == b""
    assert vm.agent_events("request refused: agent stopping")
    assert release(call) == (b"start\ngot go\n", 3)
    assert vm.agent.wait(timeout=30) == 0


def service_processes(host: Host, service: str) -> list[psutil.Process]:
    """The live processes running ``service`` (a file of a service dir)."""
    found = []
    for proc in marked_processes(host.mark):
        try:
            if any(part.endswith(f"/{service}") for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_agent_cancels_a_call_past_the_deadline(host: Host,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    env = host.env
    monkeypatch.setattr(host, "env", lambda domid, **extra: env(
        domid, **({"QREXEC_TIMEOUT_STOP_GRACE": "0.5"} if domid == 42 else {}), **extra))
    vm = host.start_vm("vm1", 42)
    vm.add_service("test.Hold", f"#!/bin/sh\n{HOLD}\n")
    assert vm.agent is not None
    call = vm.start_client(f"{vm.user}:QUBESRPC test.Hold dom0", stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert call.stdout is not None and call.stdout.readline() == b"start\n"
    assert service_processes(host, "test.Hold")
    vm.agent.send_signal(signal.SIGTERM)
    assert vm.agent.wait(timeout=30) == 0
    assert vm.agent_events("stop deadline passed; cancelling live connections")
    assert not service_processes(host, "test.Hold")
    call.communicate(timeout=60)  # ended, however it reports it
    assert not (vm.runtime_dir / "qrexec-agent").exists()


def test_daemon_cancels_a_call_past_the_deadline(host: Host) -> None:
    """A VM's call to a dom0 service: the daemon's own child is killed."""
    vm = host.add_vm("vm1", 42)
    vm.start_agent()
    vm.start_daemon("--stop-grace", "0.5")
    assert vm.daemon is not None
    service = host.dom0_services / "test.Hold"
    service.write_text(f"#!/bin/sh\n{HOLD}\n")
    service.chmod(0o755)
    host.set_policy("test.Hold * vm1 dom0 allow\n")
    call = vm.start_client_vm("dom0", "test.Hold", stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert call.stdout is not None and call.stdout.readline() == b"start\n"
    assert service_processes(host, "test.Hold")
    vm.daemon.send_signal(signal.SIGTERM)
    assert vm.daemon.wait(timeout=30) == 0
    assert vm.daemon_events("stop deadline passed; cancelling live connections")
    assert not service_processes(host, "test.Hold")
    call.communicate(timeout=60)
    assert not (host.socket_dir / "qrexec.42").exists()


# -- reload ------------------------------------------------------------------------------

def test_a_call_finishes_across_sighup(host: Host) -> None:
    vm = host.start_vm("vm1", 42)
    assert vm.agent is not None and vm.daemon is not None
    call = hold(vm)
    for proc in (vm.daemon, vm.agent):
        proc.send_signal(signal.SIGHUP)
    wait_for(lambda: vm.agent_events("reloaded") and vm.daemon_events("reloaded"),
             what="both programs reloaded")
    # No signal whose default is to end a process quietly ends either
    # (SIGUSR1, SIGALRM, SIGPROF, SIGIO, the real-time ones...).
    for proc in (vm.daemon, vm.agent):
        for signum in QUIET_ENDS:
            proc.send_signal(signum)
    wait_for(lambda: any(e.get("signal") == "SIGRTMAX" for e in vm.agent_events("signal ignored")),
             what="the agent's log of the signals")
    assert release(call) == (b"start\ngot go\n", 3)
    result = vm.client(f"{vm.user}:echo after")
    assert result.stdout == b"after\n", result.stderr
    assert vm.daemon.poll() is None and vm.agent.poll() is None


def test_policy_daemon_reads_the_policy_again_on_sighup(host: Host) -> None:
    host.set_policy("test.Echo * vm1 vm2 deny\n")
    daemon = start_policy_daemon(host)
    try:
        assert daemon.ask(c_request("vm2", "test.Echo+arg")) == b"result=deny"
        host.set_policy("test.Echo * vm1 vm2 allow\ntest.Other * vm1 vm2 deny\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.events("reloaded"), what="the reload")
        (reloaded,) = daemon.events("reloaded")
        assert reloaded["what"] == "policy (2 rules)"
        assert daemon.ask(c_request("vm2", "test.Echo+arg")) == ALLOW_VM2
        for signum in QUIET_ENDS:  # none of these ends it
            daemon.proc.send_signal(signum)
        wait_for(lambda: any(e.get("signal") == "SIGRTMAX"
                             for e in daemon.events("signal ignored")),
                 what="the policy daemon's log of the signals")
        assert daemon.ask(c_request("vm2", "test.Echo+arg")) == ALLOW_VM2
    finally:
        assert daemon.stop() == 0
        daemon.notify.close()


def test_sigterm_before_ready_is_a_clean_stop(host: Host,
                                              monkeypatch: pytest.MonkeyPatch,
                                              notify: Callable[[str], NotifySocket]) -> None:
    """An agent whose dom0 never came: SIGTERM while it waits stops it cleanly."""
    agent_notify = notify("agent")
    notified_env(host, monkeypatch, {42: agent_notify})
    vm = host.add_vm("vm1", 42)
    vm.start_agent()
    assert vm.agent is not None
    wait_for(lambda: vm.agent_events("offering control vchan"), what="the agent waiting")
    vm.agent.send_signal(signal.SIGTERM)
    assert vm.agent.wait(timeout=30) == 0
    agent_notify.until_message("STOPPING=1")
    (stopping,) = agent_notify.without_pings()  # never READY
    assert stopping.startswith("STOPPING=1\n")
    assert not (vm.runtime_dir / "qrexec-agent").exists()
