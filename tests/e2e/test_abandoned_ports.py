"""A dom0 caller that abandons its call frees the call's data port at once.

The caller (``qrexec-client``) offers the data vchan; the target's agent is
stopped (SIGSTOP) so it cannot connect in time, and the caller gives up (its
accept timeout, ``-w``) or is killed. Once the agent runs again it must fail
its connect at once, report the call's end, and so free the daemon's port:
not after its own connect timeout (120 s, set explicitly here), which under
load ran the daemon out of ports.

What proves the port free: the daemon logs "port released" for it, and the
next call is given that same port (a daemon hands dom0 calls the lowest free
port) and works. Bounds are hang guards far below 120 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

from harness import VM, Host, wait_for

#: The agent's real default: waiting it out is what this test must not see.
AGENT_CONNECT_TIMEOUT = "120"
#: Far below AGENT_CONNECT_TIMEOUT, far above what freeing the port takes.
BOUND = 20.0


@pytest.fixture
def vm1(host: Host, monkeypatch: pytest.MonkeyPatch) -> VM:
    """vm1 (domid 42), every program of the host with the real data-vchan connect timeout."""
    env = host.env

    def patient_env(domid: int, **extra: str) -> dict[str, str]:
        return env(domid, **{"QREXEC_TIMEOUT_DATA_VCHAN_CONNECT": AGENT_CONNECT_TIMEOUT,
                             **extra})

    monkeypatch.setattr(host, "env", patient_env)
    return host.start_vm("vm1", 42)


@pytest.fixture
def stopped_agent(vm1: VM) -> Iterator[Callable[[], None]]:
    """Stop vm1's agent now; the fixture's value resumes it (and teardown, in any case)."""
    assert vm1.agent is not None
    pid = vm1.agent.pid
    os.kill(pid, signal.SIGSTOP)

    def resume() -> None:
        os.kill(pid, signal.SIGCONT)

    try:
        yield resume
    finally:
        resume()


def _forwarded_ports(vm: VM) -> list[int]:
    """The data port of each call the daemon forwarded to the agent, in order."""
    return [event["port"] for event in vm.daemon_events("request forwarded")]


def _released(vm: VM, port: int) -> bool:
    return any(event.get("port") == port for event in vm.daemon_events("port released"))


def _port_is_free_and_reused(vm: VM, port: int, why: str) -> None:
    wait_for(lambda: _released(vm, port), timeout=BOUND,
             what=f"the daemon to free port {port} (not after the agent's 120 s)")
    failed = [event.get("error", "") for event in vm.agent_events("connection failed")]
    assert len(failed) == 1 and why in failed[0], failed
    result = vm.client(f"{vm.user}:echo again", timeout=BOUND)
    assert (result.returncode, result.stdout) == (0, b"again\n"), result.stderr
    assert _forwarded_ports(vm)[-1] == port  # the lowest free port: this one again


def test_a_caller_that_gives_up_frees_its_port_at_once(
        vm1: VM, stopped_agent: Callable[[], None]) -> None:
    gave_up = vm1.client(f"{vm1.user}:echo never", "-w", "1", timeout=BOUND)
    assert gave_up.returncode != 0
    wait_for(lambda: _forwarded_ports(vm1), timeout=BOUND, what="the call's data port")
    (port,) = _forwarded_ports(vm1)
    assert not _released(vm1, port)  # the stopped agent has not said a word yet
    stopped_agent()
    _port_is_free_and_reused(vm1, port, "withdrew its offer")
    assert not (vm1.host.vchan_dir / f"vchan.0.42.{port}.sock.withdrawn").exists()


def test_a_caller_killed_outright_frees_its_port_at_once(
        host: Host, vm1: VM, stopped_agent: Callable[[], None]) -> None:
    caller = vm1.start_client(f"{vm1.user}:echo never", "-w", "0",
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        # Killed while it offers its data vchan: its socket stays behind.
        wait_for(lambda: _forwarded_ports(vm1), timeout=BOUND, what="the call's data port")
        (port,) = _forwarded_ports(vm1)
        offer = host.vchan_dir / f"vchan.0.42.{port}.sock"
        wait_for(offer.exists, timeout=BOUND, what="the caller to offer its data vchan")
    finally:
        caller.kill()
        caller.wait()
    assert offer.exists()
    stopped_agent()
    _port_is_free_and_reused(vm1, port, "is gone")
    assert not offer.exists()  # the dead caller's leftover went with it
