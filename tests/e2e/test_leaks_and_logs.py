"""Nothing leaks across calls, and every connection logs with its context."""

from __future__ import annotations

import json

import psutil

from harness import VM, wait_for


def _fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


def test_no_fd_leak_in_daemon_or_agent_across_calls(vm1: VM) -> None:
    assert vm1.agent is not None and vm1.daemon is not None
    assert vm1.client(f"{vm1.user}:true").returncode == 0
    wait_for(lambda: vm1.daemon_events("port released"), what="the first port release")
    agent_fds, daemon_fds = _fds(vm1.agent.pid), _fds(vm1.daemon.pid)
    for i in range(30):
        cmd = f"{vm1.user}:exit 1" if i % 3 else f"{vm1.user}:QUBESRPC test.Missing dom0"
        vm1.client(cmd)
    wait_for(lambda: len(vm1.daemon_events("port released")) == 31, what="all ports released")
    wait_for(lambda: (_fds(vm1.agent.pid), _fds(vm1.daemon.pid)) == (agent_fds, daemon_fds),
             timeout=5, what=f"fd counts back to {agent_fds}/{daemon_fds}")


def test_every_connection_logs_with_its_bound_context(vm1: VM) -> None:
    result = vm1.client(f"{vm1.user}:true", "--log-level", "debug")
    assert result.returncode == 0
    wait_for(lambda: vm1.agent_events("finished"), what="the agent's log line")
    call = f"{vm1.domid}.513"  # the VM's domain and the data port: one id for all three
    (running,) = vm1.agent_events("running")
    assert running["call"] == call and running["domain"] == 0 and running["port"] == 513
    assert running["program"] == "qrexec-agent"
    (forwarded,) = vm1.daemon_events("request forwarded")
    assert forwarded["call"] == call
    assert forwarded["port"] == 513 and forwarded["vm"] == "vm1" and forwarded["client"] == 1
    client_lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert client_lines and all(line.get("call") == call for line in client_lines
                                if line["event"] != "vchan backend")
    assert {"timestamp", "level"} <= set(forwarded)
