"""The short-lived clients' blocking driver, end to end: real agents and daemons, the
clients as separate processes. Which calls take it, and how a call ends when the client
is stopped by a signal or its output's reader goes away (the host fixture then proves
nothing was left running)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from harness import VM, Host, program

TIMEOUT = 30
FALLBACK = b"the trio driver runs this call"
#: A service that says it started, then waits (for the stop of its caller).
WAITER = "#!/bin/sh\necho started\nexec sleep 60\n"


@pytest.fixture
def vm2(host: Host) -> VM:
    """vm2 (43), the target; vm1 may call its test.* services."""
    vm = host.start_vm("vm2", 43)
    with open(host.policy_d / "50-test.policy", "a") as policy:
        policy.write("test.Echo * vm1 vm2 allow\ntest.Wait * vm1 vm2 allow\n")
    vm.add_service("test.Echo", "#!/bin/sh\nexec cat\n")
    vm.add_service("test.Wait", WAITER)
    return vm


def _client_vm(vm: VM, *args: str) -> list[str]:
    return [program("qrexec-client-vm"), "--agent-socket", str(vm.runtime_dir / "qrexec-agent"),
            "--log-level", "debug", "--log-format", "json", *args]


def _client(host: Host, *args: str) -> list[str]:
    return [program("qrexec-client"), "--socket-dir", str(host.socket_dir), "--log-level",
            "debug", "--log-format", "json", *args]


@pytest.mark.parametrize("path", ["--use-r2-fdpass", "--use-trigger-socket"])
def test_a_call_with_our_stdio_takes_the_blocking_driver(
        vm1: VM, vm2: VM, host: Host, path: str) -> None:
    result = subprocess.run(_client_vm(vm1, path, "vm2", "test.Echo"), input=b"data",
                            capture_output=True, env=host.env(vm1.domid), timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (0, b"data"), result.stderr
    assert FALLBACK not in result.stderr
    dom0 = subprocess.run(_client(host, "-d", "vm2", "DEFAULT:QUBESRPC test.Echo dom0"),
                          input=b"dom0 data", capture_output=True, env=host.env(0),
                          timeout=TIMEOUT)
    assert (dom0.returncode, dom0.stdout) == (0, b"dom0 data"), dom0.stderr
    assert FALLBACK not in dom0.stderr


def test_a_local_program_goes_to_the_trio_driver_with_the_same_result(
        vm1: VM, vm2: VM, host: Host) -> None:
    # PROG sends a line, ends the service's input, and copies what comes back to our stdout.
    prog = "echo via-prog; exec 1>&-; cat >&$SAVED_FD_1"
    result = subprocess.run(
        _client_vm(vm1, "vm2", "test.Echo", "/bin/sh", "-c", prog),
        capture_output=True, env=host.env(vm1.domid), timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (0, b"via-prog\n"), result.stderr
    assert FALLBACK in result.stderr


def _started(proc: subprocess.Popen[bytes]) -> None:
    """Until the service said it started (its first line on our stdout)."""
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"


@pytest.mark.parametrize(("stop", "path"), [
    (signal.SIGTERM, "--use-r2-fdpass"), (signal.SIGINT, "--use-trigger-socket"),
    (signal.SIGHUP, "--use-trigger-socket"),
])
def test_a_stop_signal_ends_a_vm_call_with_128_plus_n(
        vm1: VM, vm2: VM, host: Host, stop: signal.Signals, path: str) -> None:
    proc = subprocess.Popen(_client_vm(vm1, path, "vm2", "test.Wait"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=host.env(vm1.domid))
    try:
        _started(proc)
        proc.send_signal(stop)
        assert proc.wait(TIMEOUT) == 128 + stop
    finally:
        proc.kill()
        proc.communicate()


def test_a_stop_signal_ends_a_dom0_call_and_its_vchan(vm1: VM, host: Host) -> None:
    vm1.add_service("test.Wait", WAITER)
    proc = subprocess.Popen(_client(host, "-d", "vm1", "DEFAULT:QUBESRPC test.Wait dom0"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=host.env(0))
    try:
        _started(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate()
    # Our offer of the data vchan (served) left nothing under its name.
    assert not [name for name in os.listdir(host.vchan_dir) if name.startswith("vchan.0.")]


def test_a_reader_that_goes_away_does_not_change_a_dom0_calls_status(
        vm1: VM, host: Host) -> None:
    vm1.add_service("test.Lots", "#!/bin/sh\nhead -c 4000000 /dev/zero\nexit 7\n")
    read, write = os.pipe()
    with open(read, "rb") as reader:
        proc = subprocess.Popen(_client(host, "-d", "vm1", "DEFAULT:QUBESRPC test.Lots dom0"),
                                stdin=subprocess.DEVNULL, stdout=write,
                                stderr=subprocess.PIPE, env=host.env(0))
        os.close(write)
        assert reader.read(1000)  # some of it came; then the reader leaves
    _, errors = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 7, errors


def _with_closed(fd: int, argv: list[str], env: dict[str, str],
                 stdin: bytes = b"in") -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` with ``fd`` closed (the shell's ``N<&-``); its stdout and stderr."""
    return subprocess.run(["sh", "-c", f'"$@" {fd}<&-', "sh", *argv], input=stdin,
                          capture_output=True, env=env, timeout=TIMEOUT)


@pytest.mark.parametrize("path", ["--use-r2-fdpass", "--use-trigger-socket"])
def test_a_vm_call_with_a_closed_standard_fd_runs_as_with_dev_null(
        vm1: VM, vm2: VM, host: Host, path: str) -> None:
    argv = _client_vm(vm1, path, "vm2", "test.Echo")
    env = host.env(vm1.domid)
    no_input = _with_closed(0, argv, env)
    assert (no_input.returncode, no_input.stdout) == (0, b""), no_input.stderr
    no_output = _with_closed(1, argv, env)
    assert no_output.returncode == 0, no_output.stderr
    no_errors = _with_closed(2, argv, env)
    assert (no_errors.returncode, no_errors.stdout) == (0, b"in")


def test_a_dom0_call_with_a_closed_stdin_reads_it_as_empty(vm1: VM, host: Host) -> None:
    result = _with_closed(0, _client(host, "-d", "vm1", "DEFAULT:QUBESRPC test.Echo dom0"),
                          host.env(0))
    assert (result.returncode, result.stdout) == (0, b"arg= src=dom0\n"), result.stderr
