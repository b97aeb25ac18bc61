"""The agent as a drop-in for today's: the reference's command line suffices, big
early stdin is buffered, R2 command files run (issue 10)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from harness import VM, Host, program, wait_for


def _tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the agent as another user")
def test_the_reference_command_line_suffices_for_an_unprivileged_agent(host: Host) -> None:
    """`qrexec-agent --agent-socket=PATH`, run as nobody, with only PATH's directory
    (and the vchan directory, which stands in for Xen) writable."""
    reachable = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         program("qrexec-agent"), "--help"], capture_output=True, check=False)
    if reachable.returncode != 0:
        # The checkout itself is out of nobody's reach (e.g. under a 0700
        # directory): an environment limit, not the agent's. CI's fresh-clone
        # run makes its checkout readable, so it runs there.
        pytest.skip(f"nobody cannot run this checkout's programs: {reachable.stderr[-200:]!r}")
    vm = host.add_vm("vm9", 49, user="nobody")
    host.root.chmod(0o711)  # nobody may pass through the test's directory, nothing more
    home = host.root / "agent-home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)  # the umask may have taken bits away
    host.vchan_dir.chmod(0o777)
    vm.add_service("test.Who", "#!/bin/sh\nid -un\n")
    before_runtime = _tree(vm.runtime_dir) if vm.runtime_dir.exists() else set()
    socket = home / "agent.vm9.sock"
    env = host.env(vm.domid, QREXEC_SERVICE_PATH=str(vm.service_dir),
                   QUBES_RPC_CONFIG_PATH=str(host.root / "rpc-config"))
    with open(vm.agent_log, "ab") as log:
        vm.agent = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             program("qrexec-agent"), f"--agent-socket={socket}", "--no-fork-server",
             "--log-level", "debug"],
            env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    vm.start_daemon()
    # The socket vchan is a file: the caller's must be connectable by nobody (on
    # Xen there is no such file).
    umask = os.umask(0)
    try:
        result = vm.client("nobody:QUBESRPC test.Who dom0")
    finally:
        os.umask(umask)
    assert (result.returncode, result.stdout) == (0, b"nobody\n"), vm.agent_log.read_text()
    assert vm.agent.poll() is None
    # Everything the agent made is beside its socket.
    assert {name for name in _tree(home)} >= {"agent.vm9.sock", "agent.vm9.sock-fdpass",
                                               "agent.vm9.sock-fifo"}
    assert all(name.startswith("agent.vm9.sock") for name in _tree(home))
    assert (_tree(vm.runtime_dir) if vm.runtime_dir.exists() else set()) == before_runtime


def test_big_stdin_before_the_service_reads_is_delivered(vm1: VM) -> None:
    """o: 256 KiB of stdin, all sent before the service reads a byte."""
    vm1.add_service("test.Count", "#!/bin/sh\nsleep 1; wc -c\n")
    result = vm1.client(f"{vm1.user}:QUBESRPC test.Count dom0", input=bytes(262144),
                        timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == b"262144"


def test_a_non_executable_service_file_runs_as_an_r2_command_file(vm1: VM) -> None:
    """Item 8: a handler without the x bit runs with /bin/sh, as R2's multiplexer did
    (the reference agent answers 125: the issue asks for R2's behaviour)."""
    vm1.add_service("test.NoExec", 'echo "r2 src=$QREXEC_REMOTE_DOMAIN"; cat\n', mode=0o644)
    result = vm1.client(f"{vm1.user}:QUBESRPC test.NoExec+arg dom0", input=b"ping\n")
    assert (result.returncode, result.stdout) == (0, b"r2 src=dom0\nping\n"), result.stderr


def test_a_dangling_service_symlink_refuses_only_that_call(vm1: VM) -> None:
    (vm1.service_dir / "test.Gone").symlink_to(vm1.service_dir / "nowhere")
    gone = vm1.client(f"{vm1.user}:QUBESRPC test.Gone dom0")
    assert gone.returncode == 127
    wait_for(lambda: vm1.agent.poll() is None, what="the agent still running")
    assert vm1.client(f"{vm1.user}:true").returncode == 0


def test_wait_for_session_holds_the_service_until_the_session_is_up(vm1: VM) -> None:
    """l: qubes.WaitForSession runs first (no argument, the caller as
    QREXEC_REMOTE_DOMAIN, the user's name on stdin); the service starts after it."""
    log = vm1.host.root / "session.log"
    vm1.add_service("qubes.WaitForSession",
                    f'#!/bin/sh\nread user\necho "wfs-start arg=[$1] src=$QREXEC_REMOTE_DOMAIN '
                    f'user=$user" >>{log}\nsleep 1\necho wfs-end >>{log}\n')
    vm1.add_service("test.Wfs", f'#!/bin/sh\necho "start arg=[$1]" >>{log}\n'
                                'echo "wfs arg=$1"; cat\n')
    vm1.add_config("test.Wfs", "wait-for-session = 1\n")
    result = vm1.client(f"{vm1.user}:QUBESRPC test.Wfs+arg dom0", input=b"ping\n")
    assert (result.returncode, result.stdout) == (0, b"wfs arg=arg\nping\n"), result.stderr
    assert log.read_text().splitlines() == [
        f"wfs-start arg=[] src=dom0 user={vm1.user}", "wfs-end", "start arg=[arg]"]


def test_without_wait_for_session_no_waiting_service_runs(vm1: VM) -> None:
    log = vm1.host.root / "session.log"
    vm1.add_service("qubes.WaitForSession", f"#!/bin/sh\necho ran >>{log}\n")
    vm1.add_config("test.Echo", "wait-for-session = false\n")
    result = vm1.client(f"{vm1.user}:QUBESRPC test.Echo+arg dom0", input=b"ping\n")
    assert result.returncode == 0, result.stderr
    assert not log.exists()


def test_an_invalid_config_refuses_the_call_with_125_and_names_file_and_line(vm1: VM) -> None:
    """m: the reference's parser rejects double quotes; the call fails with 125
    after the data vchan connected, without running the service."""
    marker = vm1.host.root / "ran"
    vm1.add_service("test.Bad", f"#!/bin/sh\ntouch {marker}\n")
    path = vm1.add_config("test.Bad", 'wait-for-session = "maybe"\n')
    result = vm1.client(f"{vm1.user}:QUBESRPC test.Bad+arg dom0", input=b"ping\n")
    assert (result.returncode, result.stdout) == (125, b"")
    assert not marker.exists()
    (error,) = vm1.agent_events("could not load the service's configuration")
    assert f"{path}:1:" in error["error"] and "Double-quoted strings" in error["error"]
    assert vm1.client(f"{vm1.user}:true").returncode == 0  # everyone else is served


def test_an_argument_config_wins_over_the_service_config(vm1: VM) -> None:
    """Looked up SVC+ARG first, then SVC: a bad SVC file does not matter."""
    vm1.add_config("test.Echo+good", "wait-for-session = false\n")
    vm1.add_config("test.Echo", "not valid\n")
    good = vm1.client(f"{vm1.user}:QUBESRPC test.Echo+good dom0", input=b"x")
    assert good.returncode == 0, good.stderr
    other = vm1.client(f"{vm1.user}:QUBESRPC test.Echo+other dom0", input=b"x")
    assert other.returncode == 125


def test_a_config_that_is_a_directory_or_unreadable_never_kills_the_agent(vm1: VM) -> None:
    vm1.config_dir.mkdir(exist_ok=True)
    (vm1.config_dir / "test.Echo+dir").mkdir()
    huge = vm1.add_config("test.Echo+huge", "# x\n" * 40000)
    assert huge.stat().st_size > 65536
    assert vm1.client(f"{vm1.user}:QUBESRPC test.Echo+dir dom0", input=b"x").returncode == 0
    assert vm1.client(f"{vm1.user}:QUBESRPC test.Echo+huge dom0", input=b"x").returncode == 125
    assert vm1.agent is not None and vm1.agent.poll() is None, vm1.agent_log.read_text()[-3000:]


USR1_SERVICE = ('#!/bin/sh\nkill -USR1 $QREXEC_AGENT_PID\necho hello >&0\nread x\n'
                'echo "received: $x" >&0\n')


def test_sigusr1_switches_that_connection_to_its_stdin_socket(vm1: VM) -> None:
    """k2: after SIGUSR1 to QREXEC_AGENT_PID, what the service writes to fd 0 is its
    stdout; stdin still arrives on fd 0."""
    vm1.add_service("test.Usr1", USR1_SERVICE)
    call = vm1.start_client(f"{vm1.user}:QUBESRPC test.Usr1 dom0",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert call.stdin is not None and call.stdout is not None
    assert call.stdout.readline() == b"hello\n"
    call.stdin.write(b"stdin\n")
    call.stdin.flush()
    assert call.stdout.read() == b"received: stdin\n"
    assert call.wait(30) == 0


def test_signals_for_the_agent_disturb_nothing(vm1: VM) -> None:
    """SIGUSR1 for one connection switches only that one; SIGUSR1, SIGUSR2 and SIGHUP
    sent to the agent itself are ignored."""
    vm1.add_service("test.Usr1", USR1_SERVICE)
    bystander = vm1.start_client(f"{vm1.user}:QUBESRPC test.Echo+x dom0",
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert bystander.stdin is not None and bystander.stdout is not None
    assert bystander.stdout.readline() == b"arg=x src=dom0\n"
    switched = vm1.client(f"{vm1.user}:QUBESRPC test.Usr1 dom0", input=b"in\n")
    assert (switched.returncode, switched.stdout) == (0, b"hello\nreceived: in\n"), \
        vm1.agent_log.read_text()[-4000:]
    assert vm1.agent is not None
    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        vm1.agent.send_signal(signum)
    bystander.stdin.write(b"still here\n")
    bystander.stdin.flush()
    assert bystander.stdout.readline() == b"still here\n"
    bystander.stdin.close()
    assert bystander.wait(30) == 0
    assert vm1.agent.poll() is None
    assert vm1.client(f"{vm1.user}:true").returncode == 0
