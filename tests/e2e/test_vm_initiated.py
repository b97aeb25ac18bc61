"""VM-initiated calls end to end: qrexec-client-vm in one VM, the service in
another VM or in dom0, with real agents and daemons for two VMs over the
socket backend, the policy evaluated in the daemon, and the two vchan legs
glued in dom0."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from harness import VM, Host, is_program, marked_processes, wait_for

ECHO = '#!/bin/sh\necho "arg=$1 src=$QREXEC_REMOTE_DOMAIN"\nexec cat\n'
PATHS = {"r2": (), "socket": ("--use-trigger-socket",)}


@pytest.fixture
def pair(host: Host) -> tuple[VM, VM]:
    """vm1 (42) and vm2 (43), each with its agent and daemon, vm2 with services."""
    vm1 = host.start_vm("vm1", 42)
    vm2 = host.start_vm("vm2", 43)
    vm2.add_service("test.Echo", ECHO)
    return vm1, vm2


@pytest.mark.parametrize("path", sorted(PATHS))
def test_vm_to_vm_call(pair: tuple[VM, VM], host: Host, path: str) -> None:
    vm1, _ = pair
    host.set_policy("test.Echo * vm1 vm2 allow\n")
    result = vm1.client_vm("vm2", "test.Echo+arg", *PATHS[path], input=b"to-vm2\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"arg=arg src=vm1\nto-vm2\n"


def test_vm_to_vm_64_mib_each_way_checksummed(pair: tuple[VM, VM], host: Host,
                                               short_tmp: Path) -> None:
    vm1, vm2 = pair
    size = 64 * 1024 * 1024
    vm2.add_service("test.Hash",
                    "#!/bin/sh\nsha256sum | cut -d' ' -f1 >&2\nhead -c 67108864 /dev/zero\n")
    host.set_policy("test.Hash * vm1 vm2 allow\n")
    source = short_tmp / "in.bin"
    source.write_bytes(os.urandom(size))
    with open(source, "rb") as stdin:
        result = vm1.client_vm("vm2", "test.Hash", stdin=stdin, timeout=300)
    assert result.returncode == 0, result.stderr[-300:]
    assert result.stderr.decode().strip() == hashlib.sha256(source.read_bytes()).hexdigest()
    assert len(result.stdout) == size and result.stdout.count(0) == size


@pytest.mark.parametrize("path", sorted(PATHS))
def test_vm_to_dom0_call(pair: tuple[VM, VM], host: Host, path: str) -> None:
    vm1, _ = pair
    service = host.dom0_services / "test.Echo"
    service.write_text(ECHO)
    service.chmod(0o755)
    host.set_policy("test.Echo * vm1 dom0 allow\n")
    result = vm1.client_vm("dom0", "test.Echo+arg", *PATHS[path], input=b"to-dom0\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"arg=arg src=vm1\nto-dom0\n"


@pytest.mark.parametrize("path", sorted(PATHS))
def test_deny_is_126_request_refused(pair: tuple[VM, VM], host: Host, path: str) -> None:
    vm1, _ = pair
    host.set_policy("test.Echo * vm1 vm2 deny\n")
    result = vm1.client_vm("vm2", "test.Echo", *PATHS[path], input=b"x")
    assert (result.returncode, result.stdout) == (126, b"")
    assert b"Request refused" in result.stderr


def test_no_policy_denies(pair: tuple[VM, VM]) -> None:
    vm1, _ = pair
    assert vm1.client_vm("vm2", "test.Echo").returncode == 126


def test_service_missing_at_the_target_is_127(pair: tuple[VM, VM], host: Host) -> None:
    vm1, _ = pair
    host.set_policy("test.Nope * vm1 vm2 allow\n")
    assert vm1.client_vm("vm2", "test.Nope").returncode == 127


def test_remote_exit_code_and_prog_mode(pair: tuple[VM, VM], host: Host) -> None:
    vm1, vm2 = pair
    vm2.add_service("test.Exit", "#!/bin/sh\nread x; echo got $x; exit 5\n")
    host.set_policy("test.Exit * vm1 vm2 allow\n")
    plain = vm1.client_vm("vm2", "test.Exit", input=b"hi\n")
    assert (plain.returncode, plain.stdout) == (5, b"got hi\n")
    # With a local program, the program talks to the service; as the reference's
    # code does, a non-zero remote status wins over the program's.
    prog = ["/bin/sh", "-c", 'echo ping; read answer; echo "$answer" >&2; exit 3']
    with_prog = vm1.client_vm("vm2", "test.Exit", prog=prog)
    assert with_prog.returncode == 5, with_prog.stderr
    assert with_prog.stderr.endswith(b"got ping\n")
    vm2.add_service("test.Zero", "#!/bin/sh\nread x; echo got $x\n")
    host.set_policy("test.Zero * vm1 vm2 allow\n", name="60-zero.policy")
    remote_ok = vm1.client_vm("vm2", "test.Zero", prog=prog)
    assert remote_ok.returncode == 3, remote_ok.stderr  # then the program's status


def test_fifty_concurrent_calls_from_one_vm(pair: tuple[VM, VM], host: Host) -> None:
    vm1, _ = pair
    host.set_policy("test.Echo * vm1 vm2 allow\n")
    calls = [vm1.start_client_vm("vm2", f"test.Echo+c{i}", stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(50)]
    payloads = [os.urandom(10_000) for _ in calls]
    for i, (call, payload) in enumerate(zip(calls, payloads, strict=True)):
        out, err = call.communicate(payload, timeout=180)
        assert call.returncode == 0, err
        assert out == f"arg=c{i} src=vm1\n".encode() + payload


def test_calls_above_the_pending_limit_are_refused_at_once(host: Host) -> None:
    vm1 = host.add_vm("vm1", 42)
    vm1.start_agent()
    vm1.start_daemon("--max-calls", "3")
    vm2 = host.start_vm("vm2", 43)
    vm2.add_service("test.Slow", "#!/bin/sh\nsleep 2; echo done\n")
    host.set_policy("test.Slow * vm1 vm2 allow\n")
    slow = [vm1.start_client_vm("vm2", "test.Slow", stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(3)]
    wait_for(lambda: len([p for p in marked_processes(host.mark) if is_program(p, "sleep")]) == 3,
             what="three calls running")
    extra = vm1.client_vm("vm2", "test.Slow", timeout=10)
    assert extra.returncode == 126
    for call in slow:
        out, _ = call.communicate(timeout=60)
        assert (call.returncode, out) == (0, b"done\n")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("path", sorted(PATHS))
def test_killing_the_caller_ends_the_target_service_and_frees_both_ports(
    pair: tuple[VM, VM], host: Host, path: str
) -> None:
    vm1, vm2 = pair
    vm2.add_service("test.Sleep", "#!/bin/sh\necho started\nexec sleep 1000\n")
    host.set_policy("test.Sleep * vm1 vm2 allow\n")
    caller = vm1.start_client_vm("vm2", "test.Sleep", *PATHS[path], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)
    assert caller.stdout is not None
    assert caller.stdout.readline() == b"started\n"
    (service,) = [p for p in marked_processes(host.mark) if is_program(p, "sleep")]
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    wait_for(lambda: not _alive(service), what="the target service to end")
    wait_for(lambda: vm2.daemon_events("port released"), what="the target leg's port")
    wait_for(lambda: vm1.daemon_events("port released"), what="the source leg's port")


def test_killing_the_target_agent_makes_the_caller_exit_255(pair: tuple[VM, VM],
                                                            host: Host) -> None:
    vm1, vm2 = pair
    vm2.add_service("test.Sleep", "#!/bin/sh\necho started\nexec sleep 1000\n")
    host.set_policy("test.Sleep * vm1 vm2 allow\ntest.Echo * vm1 vm2 allow\n")
    caller = vm1.start_client_vm("vm2", "test.Sleep", stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert caller.stdout is not None
    assert caller.stdout.readline() == b"started\n"
    vm2.kill_agent()
    _, err = caller.communicate(timeout=30)
    assert caller.returncode == 255, err
    vm2.start_agent()
    wait_for(lambda: vm1.client_vm("vm2", "test.Echo", input=b"again", timeout=30).stdout
             == b"arg= src=vm1\nagain", timeout=30, interval=0.2, what="calls to work again")
