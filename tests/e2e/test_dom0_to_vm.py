"""dom0 -> VM commands end to end: real qrexec-client, qrexec-daemon and
qrexec-agent processes over a real vchan backend."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from harness import VM, Host, is_program, program, wait_for


def test_legacy_command_streams_stdin_stdout_stderr_and_exit_code(vm1: VM) -> None:
    result = vm1.client(f"{vm1.user}:read x; echo out $x; echo err >&2; exit 3", input=b"hello\n")
    assert result.stdout == b"out hello\n"
    assert result.stderr == b"err\n"
    assert result.returncode == 3


def test_rpc_service_gets_argument_and_source(vm1: VM) -> None:
    result = vm1.client(f"{vm1.user}:QUBESRPC test.Echo+arg dom0", input=b"ping\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"arg=arg src=dom0\nping\n"


def test_default_user_is_substituted_by_the_daemon(vm1: VM) -> None:
    result = vm1.client("DEFAULT:id -un")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == vm1.user


def test_binary_data_round_trips(vm1: VM) -> None:
    data = bytes(range(256)) * 1000 + b"\0\0\xff"
    result = vm1.client(f"{vm1.user}:cat", input=data)
    assert result.returncode == 0
    assert result.stdout == data


def test_64_mib_each_way_with_matching_sha256(vm1: VM, short_tmp: Path) -> None:
    size = 64 * 1024 * 1024
    source = short_tmp / "in.bin"
    with open(source, "wb") as f:
        f.write(os.urandom(size))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    # Upstream: the caller's 64 MiB go to the VM, which hashes them and sends
    # back 64 MiB of its own plus their hash.
    vm1.add_service(
        "test.Hash",
        "#!/bin/sh\nsha256sum | cut -d' ' -f1 >&2\nhead -c 67108864 /dev/zero\n",
    )
    with open(source, "rb") as stdin:
        result = vm1.client(f"{vm1.user}:QUBESRPC test.Hash dom0", stdin=stdin, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    assert result.stderr.decode().strip() == expected
    assert len(result.stdout) == size
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(bytes(size)).hexdigest()


def test_stdin_closed_early_service_writes_without_reading(vm1: VM) -> None:
    vm1.add_service("test.Zero", "#!/bin/sh\nhead -c 100000 /dev/zero\n")
    result = vm1.client(f"{vm1.user}:QUBESRPC test.Zero dom0", stdin=subprocess.DEVNULL)
    assert result.returncode == 0
    assert result.stdout == bytes(100000)


def test_service_that_exits_before_reading_stdin(vm1: VM) -> None:
    # Plenty of input that nobody reads: the call must still end with the exit code.
    result = vm1.client(f"{vm1.user}:exit 7", input=os.urandom(4 * 1024 * 1024))
    assert result.returncode == 7


def test_stderr_is_kept_apart_from_stdout(vm1: VM) -> None:
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done"
    result = vm1.client(f"{vm1.user}:{script}")
    assert result.stdout == b"out1\nout2\nout3\n"
    assert result.stderr == b"err1\nerr2\nerr3\n"


@pytest.mark.parametrize(
    ("command", "status"),
    [("true", 0), ("false", 1), ("exit 42", 42), ("kill -TERM $$", 128 + 15),
     ("kill -KILL $$", 128 + 9)],
)
def test_exit_codes_of_commands(vm1: VM, command: str, status: int) -> None:
    assert vm1.client(f"{vm1.user}:{command}").returncode == status


def test_service_not_found_is_127(vm1: VM) -> None:
    result = vm1.client(f"{vm1.user}:QUBESRPC test.Missing+arg dom0", input=b"ping\n")
    assert result.returncode == 127


def test_service_handler_that_is_neither_file_nor_socket_is_125(vm1: VM) -> None:
    # (A regular file without the x bit is an R2 command file: test_agent_dropin.)
    (vm1.service_dir / "test.Fifo").mkdir()
    result = vm1.client(f"{vm1.user}:QUBESRPC test.Fifo+arg dom0", input=b"ping\n")
    assert result.returncode == 125
    assert result.stdout == b""


def test_unknown_user_is_125(vm1: VM) -> None:
    assert vm1.client("no-such-user-here:true").returncode == 125


def test_argument_specific_service_wins_over_generic(vm1: VM) -> None:
    vm1.add_service("test.Which", "#!/bin/sh\necho generic $1\n")
    vm1.add_service("test.Which+special", "#!/bin/sh\necho specific $1\n")
    special = vm1.client(f"{vm1.user}:QUBESRPC test.Which+special dom0")
    other = vm1.client(f"{vm1.user}:QUBESRPC test.Which+other dom0")
    assert special.stdout == b"specific special\n"
    assert other.stdout == b"generic other\n"


def test_service_environment(vm1: VM) -> None:
    vm1.add_service(
        "test.Env",
        "#!/bin/sh\necho \"$QREXEC_SERVICE_FULL_NAME|$QREXEC_REMOTE_DOMAIN|"
        "${QREXEC_SERVICE_ARGUMENT-unset}|${QREXEC_TIMEOUT_HANDSHAKE-clean}\"\n",
    )
    with_arg = vm1.client(f"{vm1.user}:QUBESRPC test.Env+a1 dom0")
    without = vm1.client(f"{vm1.user}:QUBESRPC test.Env dom0")
    assert with_arg.stdout == b"test.Env+a1|dom0|a1|clean\n"
    assert without.stdout == b"test.Env|dom0|unset|clean\n"


def test_socket_service_receives_descriptor_then_stdin(vm1: VM, short_tmp: Path) -> None:
    import socket
    import threading

    path = vm1.service_dir / "test.Sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
            received.append(b"".join(chunks))
            conn.sendall(b"answer\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = vm1.client(f"{vm1.user}:QUBESRPC test.Sock+x dom0", input=b"question\n")
        thread.join(10)
    finally:
        server.close()
    assert received == [b"test.Sock+x dom0\0question\n"]
    assert result.stdout == b"answer\n"
    assert result.returncode == 0


def test_just_exec_starts_the_command_and_reports_0(vm1: VM, short_tmp: Path) -> None:
    marker = short_tmp / "just-exec-ran"
    result = vm1.client(f"{vm1.user}:echo started > {marker}; exit 5", "-e", input=b"ignored\n")
    assert result.returncode == 0
    wait_for(marker.exists, what="the JUST_EXEC command to run")
    assert marker.read_text() == "started\n"


def test_just_exec_of_missing_service_is_127(vm1: VM) -> None:
    assert vm1.client(f"{vm1.user}:QUBESRPC test.Missing dom0", "-e").returncode == 127


def test_twenty_concurrent_clients(vm1: VM) -> None:
    clients = [
        vm1.start_client(f"{vm1.user}:QUBESRPC test.Echo+c{i} dom0", stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(20)
    ]
    payloads = [os.urandom(100_000) for _ in clients]
    results = [c.communicate(p, timeout=60) for c, p in zip(clients, payloads, strict=True)]
    for i, ((out, err), payload) in enumerate(zip(results, payloads, strict=True)):
        assert clients[i].returncode == 0, err
        assert out == f"arg=c{i} src=dom0\n".encode() + payload
    # Every port came back: the daemon holds none once all calls ended.
    wait_for(lambda: len(vm1.daemon_events("port released")) == 20, what="20 port releases")


def test_filter_escape_characters(vm1: VM) -> None:
    command = f"{vm1.user}:printf 'a\\033[31mb\\n'; printf 'c\\033d\\n' >&2"
    plain = vm1.client(command)
    filtered = vm1.client(command, "-t", "-T")
    assert plain.stdout == b"a\x1b[31mb\n"
    assert filtered.stdout == b"a_[31mb\n"
    assert filtered.stderr == b"c_d\n"


def test_prefix_data_comes_before_stdin(vm1: VM) -> None:
    result = vm1.client(f"{vm1.user}:cat", "--prefix-data", "first,", input=b"second")
    assert result.stdout == b"first,second"


def test_no_exit_code_option(vm1: VM) -> None:
    assert vm1.client(f"{vm1.user}:exit 9", "-E").returncode == 0


def test_local_program_with_l(vm1: VM) -> None:
    result = vm1.client(f"{vm1.user}:read x; echo got $x", "-l", "echo local; cat >&2")
    assert result.returncode == 0
    assert result.stderr == b"got local\n"


def test_daemon_not_running_is_125(host: Host) -> None:
    vm = host.add_vm("ghost", 50)
    result = vm.client(f"{vm.user}:true")
    assert result.returncode == 125
    assert b"not running" in result.stderr


def test_agent_killed_mid_stream_client_exits_255_and_daemon_serves_again(vm1: VM) -> None:
    client = vm1.start_client(f"{vm1.user}:cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(b"line\n")
    client.stdin.flush()
    assert client.stdout.readline() == b"line\n"
    vm1.kill_agent()
    _, err = client.communicate(timeout=30)
    assert client.returncode == 255, err
    vm1.start_agent()
    wait_for(lambda: vm1.client(f"{vm1.user}:echo back", timeout=30).stdout == b"back\n",
             timeout=30, interval=0.2, what="the daemon to serve again")


def test_client_killed_mid_call_kills_service_and_frees_port(vm1: VM, host: Host) -> None:
    client = vm1.start_client(f"{vm1.user}:echo started; exec sleep 1000",
                              stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    assert client.stdout is not None
    assert client.stdout.readline() == b"started\n"
    sleepers = [p for p in _marked(host) if is_program(p, "sleep")]
    assert len(sleepers) == 1
    client.send_signal(signal.SIGKILL)
    client.wait()
    wait_for(lambda: not sleepers[0].is_running() or sleepers[0].status() == "zombie",
             what="the service to be killed")
    wait_for(lambda: vm1.daemon_events("port released"), what="the port to be released")
    # And the daemon still serves.
    assert vm1.client(f"{vm1.user}:echo ok").stdout == b"ok\n"


def _marked(host: Host):
    from harness import marked_processes

    return marked_processes(host.mark)


def test_daemon_background_mode_returns_once_agent_connected(host: Host) -> None:
    vm = host.add_vm("bg", 44)
    vm.start_agent()
    env = host.env(0, QREXEC_LOG_DIR=str(host.root / "logs"))
    result = subprocess.run(
        [program("qrexec-daemon"), "--socket-dir", str(host.socket_dir), str(vm.domid),
         vm.name, vm.user],
        env=env, capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert vm.client(f"{vm.user}:echo hi").stdout == b"hi\n"
    (daemon,) = [p for p in _marked(host) if "qrexec_trio.roles.daemon" in p.cmdline()]
    daemon.terminate()
    daemon.wait(10)  # not our child: psutil cannot tell its exit status
    assert not (host.socket_dir / "qrexec.44").exists()
    assert not (host.socket_dir / "qrexec.bg").exists()
    assert (host.root / "logs" / "qrexec.bg.log").stat().st_size > 0


def test_daemon_background_mode_times_out_with_3(host: Host) -> None:
    env = host.env(0, QREXEC_LOG_DIR=str(host.root / "logs"), QREXEC_STARTUP_TIMEOUT="1")
    result = subprocess.run(
        [program("qrexec-daemon"), "--socket-dir", str(host.socket_dir), "77", "nobody-home",
         "user"],
        env=env, capture_output=True, timeout=60,
    )
    assert result.returncode == 3
    assert b"did not connect" in result.stderr
