"""qrexec-client-vm as a drop-in for the reference's: the path it picks, every
option the reference takes, when it closes its stdout and exits, a reader that
goes away, PROG and PASS_LOCAL_STDERR. Real programs: vm1's agent and daemon,
vm2's agent and daemon running the service (the call glued in dom0), the
policy evaluated in vm1's daemon."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import VM, Host, program

PATHS = {"r2": ("--use-r2-fdpass",), "trigger": ("--use-trigger-socket",)}
ECHO = '#!/bin/sh\necho "arg=$1"\nexec cat\n'
TIMEOUT = 30


@pytest.fixture
def vm2(host: Host) -> VM:
    """vm2 (43), the target of every call here."""
    return host.start_vm("vm2", 43)


def _service(host: Host, name: str, body: str) -> None:
    host.vms["vm2"].add_service(name, body)
    with open(host.policy_d / "50-test.policy", "a") as policy:
        policy.write(f"{name} * vm1 vm2 allow\n")


def _argv(vm: VM, *args: str) -> list[str]:
    return [program("qrexec-client-vm"), "--agent-socket", str(vm.runtime_dir / "qrexec-agent"),
            *args]


def _env(vm: VM, **extra: str) -> dict[str, str]:
    env = vm.host.env(vm.domid, **extra)
    if "PASS_LOCAL_STDERR" not in extra:
        env.pop("PASS_LOCAL_STDERR", None)
    return env


def _run(vm: VM, *args: str, input: bytes = b"", **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(_argv(vm, *args), input=input, capture_output=True,
                          env=_env(vm, **env), timeout=TIMEOUT)


def _start(vm: VM, *args: str, **popen: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_argv(vm, *args), env=_env(vm), **popen)  # type: ignore[call-overload]


def _read_to_eof(fd: int, timeout: float = TIMEOUT) -> bytes:
    """Everything up to EOF on ``fd``, or fail after ``timeout``."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no EOF within {timeout}s; read {data!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data
            data += chunk


def _used(vm: VM) -> set[str]:
    """Which request paths vm1's agent has served so far."""
    used = set()
    if vm.agent_events("fdpass socket handed out"):
        used.add("r2")
    if vm.agent_events("client connecting"):
        used.add("trigger")
    return used


@contextmanager
def _reference_agent(vm: VM) -> Iterator[None]:
    """vm1's agent as a reference agent looks: only the trigger socket."""
    base = vm.runtime_dir / "qrexec-agent"
    moved = [(Path(f"{base}-{kind}"), Path(f"{base}-{kind}.away")) for kind in ("fdpass", "fifo")]
    for path, away in moved:
        path.rename(away)
    try:
        yield
    finally:
        for path, away in moved:
            away.rename(path)


# -- the path ---------------------------------------------------------------------------


def test_our_agent_gets_r2_by_default(vm1: VM, vm2: VM, host: Host) -> None:
    _service(host, "test.Echo", ECHO)
    result = _run(vm1, "vm2", "test.Echo+a", input=b"x\n")
    assert (result.returncode, result.stdout) == (0, b"arg=a\nx\n"), result.stderr
    assert _used(vm1) == {"r2"}


def test_an_agent_with_only_a_trigger_socket_gets_the_trigger_socket(
    vm1: VM, vm2: VM, host: Host
) -> None:
    _service(host, "test.Echo", ECHO)
    with _reference_agent(vm1):
        result = _run(vm1, "vm2", "test.Echo+a", input=b"x\n")
        assert (result.returncode, result.stdout) == (0, b"arg=a\nx\n"), result.stderr
        assert _used(vm1) == {"trigger"}
        # Insisting on R2 there fails, and says where it looked.
        forced = _run(vm1, "--use-r2-fdpass", "vm2", "test.Echo")
        assert forced.returncode == 1
        assert b"qrexec-agent-fifo" in forced.stderr


def test_flags_force_either_path(vm1: VM, vm2: VM, host: Host) -> None:
    _service(host, "test.Echo", ECHO)
    assert _run(vm1, "--use-trigger-socket", "vm2", "test.Echo").returncode == 0
    assert _used(vm1) == {"trigger"}
    assert _run(vm1, "--use-r2-fdpass", "vm2", "test.Echo").returncode == 0
    assert _used(vm1) == {"trigger", "r2"}
    both = _run(vm1, "--use-r2-fdpass", "--use-trigger-socket", "vm2", "test.Echo")
    assert both.returncode == 2
    # The R2 record has no source field.
    source = _run(vm1, "--use-r2-fdpass", "-s", "vm2", "vm2", "test.Echo")
    assert source.returncode == 1 and b"source qube" in source.stderr


def test_no_agent_at_all_says_so(vm1: VM) -> None:
    result = subprocess.run(
        [program("qrexec-client-vm"), "-a", str(vm1.runtime_dir / "nothing"), "vm2", "x"],
        capture_output=True, env=_env(vm1), timeout=TIMEOUT)
    assert result.returncode == 1 and b"qrexec-agent is not running" in result.stderr


# -- stdout, stdin and the exit -----------------------------------------------------------


@pytest.mark.parametrize("path", sorted(PATHS))
def test_exits_with_the_remote_status_while_its_stdin_is_open(
    vm1: VM, vm2: VM, host: Host, path: str
) -> None:
    _service(host, "test.Quick", "#!/bin/sh\necho bye\nexit 3\n")
    # As `sleep 30 | qrexec-client-vm dom0 test.Quick`: our stdin never ends.
    proc = _start(vm1, *PATHS[path], "vm2", "test.Quick", stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.wait(timeout=TIMEOUT) == 3
        assert proc.stdout is not None
        assert proc.stdout.read() == b"bye\n"
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_stdout_is_closed_when_the_remote_stdout_ends(
    vm1: VM, vm2: VM, host: Host, path: str
) -> None:
    # The service closes its stdout, then keeps reading its stdin.
    _service(host, "test.Half", "#!/bin/sh\necho out\nexec >&-\nwc -c >&2\nexit 0\n")
    proc = _start(vm1, *PATHS[path], "vm2", "test.Half", stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert _read_to_eof(proc.stdout.fileno()) == b"out\n"
        assert proc.poll() is None  # EOF on our stdout while the call goes on
        proc.stdin.write(b"four")
        proc.stdin.close()
        assert proc.wait(timeout=TIMEOUT) == 0
        assert proc.stderr is not None
        assert proc.stderr.read().strip() == b"4"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_reader_that_goes_away_drops_the_output_and_the_call_goes_on(
    vm1: VM, vm2: VM, host: Host, path: str
) -> None:
    # As `qrexec-client-vm dom0 test.Flood | head -c1`: the reference drops the
    # rest of the output, still sends its stdin, and exits with the remote status.
    _service(host, "test.Flood",
             "#!/bin/sh\nhead -c 2000000 /dev/zero\nwc -c >&2\nexit 4\n")
    reader, writer = os.pipe()
    with open(reader, "rb", buffering=0) as head:
        proc = _start(vm1, *PATHS[path], "vm2", "test.Flood", stdin=subprocess.PIPE,
                      stdout=writer, stderr=subprocess.PIPE)
        os.close(writer)
        assert _read_exactly(head, 1) == b"\0"
    # The reader is gone (closed above).
    try:
        _, err = proc.communicate(b"12345", timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 4, err
    assert err.strip().endswith(b"5")


def _read_exactly(stream: object, size: int) -> bytes:
    fd = stream.fileno()  # type: ignore[attr-defined]
    ready, _, _ = select.select([fd], [], [], TIMEOUT)
    assert ready, "no output in time"
    return os.read(fd, size)


# -- PROG ------------------------------------------------------------------------------------

PROG = ('echo ping; read answer; echo "prog got $answer" >&2; '
        'if [ -n "${SAVED_FD_2+set}" ]; then echo via-saved >/proc/self/fd/$SAVED_FD_2; '
        'else echo no-saved-fd-2 >&2; fi; exit 7')


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("pass_stderr", [False, True])
def test_prog_stderr_is_ours_and_pass_local_stderr_only_adds_saved_fd_2(
    vm1: VM, vm2: VM, host: Host, path: str, pass_stderr: bool
) -> None:
    _service(host, "test.Pong", "#!/bin/sh\nread x\necho remote-err >&2\necho pong\nexit 0\n")
    env = {"PASS_LOCAL_STDERR": "1"} if pass_stderr else {}
    result = _run(vm1, *PATHS[path], "vm2", "test.Pong", "/bin/sh", "-c", PROG, **env)
    # Remote status 0, so PROG's is ours; remote stderr and PROG's both reach our stderr.
    assert result.returncode == 7, result.stderr
    assert result.stdout == b""
    assert b"remote-err\n" in result.stderr
    assert b"prog got pong\n" in result.stderr
    assert (b"via-saved\n" if pass_stderr else b"no-saved-fd-2\n") in result.stderr


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_non_zero_remote_status_wins_over_progs(
    vm1: VM, vm2: VM, host: Host, path: str
) -> None:
    _service(host, "test.Fail", "#!/bin/sh\nread x\nexit 5\n")
    result = _run(vm1, *PATHS[path], "vm2", "test.Fail", "/bin/sh", "-c", "echo x; exit 7")
    assert result.returncode == 5, result.stderr


# -- the reference's options --------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(PATHS))
def test_escape_filters(vm1: VM, vm2: VM, host: Host, path: str) -> None:
    _service(host, "test.Esc", "#!/bin/sh\nprintf 'o\\033[1m\\n'\nprintf 'e\\033[1m\\n' >&2\n")
    plain = _run(vm1, *PATHS[path], "vm2", "test.Esc")
    assert (plain.stdout, plain.stderr) == (b"o\x1b[1m\n", b"e\x1b[1m\n")
    for option, stdout, stderr in [
        ("-t", b"o_[1m\n", b"e\x1b[1m\n"),
        ("--filter-escape-chars-stdout", b"o_[1m\n", b"e\x1b[1m\n"),
        ("-T", b"o\x1b[1m\n", b"e_[1m\n"),
        ("--filter-escape-chars-stderr", b"o\x1b[1m\n", b"e_[1m\n"),
    ]:
        result = _run(vm1, *PATHS[path], option, "vm2", "test.Esc")
        assert (result.returncode, result.stdout, result.stderr) == (0, stdout, stderr), option
    undone = _run(vm1, *PATHS[path], "-tT", "--no-filter-escape-chars-stdout",
                  "--no-filter-escape-chars-stderr", "vm2", "test.Esc")
    assert (undone.stdout, undone.stderr) == (b"o\x1b[1m\n", b"e\x1b[1m\n")


@pytest.mark.parametrize("path", sorted(PATHS))
def test_prefix_data(vm1: VM, vm2: VM, host: Host, path: str) -> None:
    _service(host, "test.Echo", ECHO)
    for option in (["-p", "PRE-"], ["-pPRE-"], ["--prefix-data", "PRE-"],
                   ["--prefix-data=PRE-"]):
        result = _run(vm1, *PATHS[path], *option, "vm2", "test.Echo", input=b"data")
        assert (result.returncode, result.stdout) == (0, b"arg=\nPRE-data"), result.stderr
    # With PROG too: the prefix goes first, then PROG's output.
    with_prog = _run(vm1, *PATHS[path], "-p", "PRE-", "vm2", "test.Echo", "/bin/sh", "-c",
                     "echo prog; read a; read b; echo \"$b\" >&2")
    assert with_prog.returncode == 0 and b"PRE-prog\n" in with_prog.stderr
    twice = _run(vm1, "-p", "a", "-p", "b", "vm2", "test.Echo")
    assert twice.returncode == 2


@pytest.mark.parametrize("path", sorted(PATHS))
def test_use_stdin_socket_carries_both_directions(
    vm1: VM, vm2: VM, host: Host, path: str
) -> None:
    _service(host, "test.Echo", ECHO)
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            proc = _start(vm1, *PATHS[path], "--use-stdin-socket", "vm2", "test.Echo+s",
                          stdin=theirs, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ours.sendall(b"both ways")
        ours.shutdown(socket.SHUT_WR)
        ours.settimeout(TIMEOUT)
        received = b""
        while chunk := ours.recv(65536):
            received += chunk
        out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert (received, out) == (b"arg=s\nboth ways", b"")


def test_use_stdin_socket_usage_errors(vm1: VM) -> None:
    not_a_socket = _run(vm1, "--use-stdin-socket", "vm2", "test.Echo")
    assert not_a_socket.returncode == 2 and b"not a socket" in not_a_socket.stderr
    ours, theirs = socket.socketpair(type=socket.SOCK_DGRAM)
    with ours, theirs:
        for args in (["--use-stdin-socket", "--use-stdin-socket", "vm2", "x"],
                     ["--use-stdin-socket", "vm2", "x", "/bin/true"]):
            result = subprocess.run(_argv(vm1, *args), stdin=theirs, capture_output=True,
                                    env=_env(vm1), timeout=TIMEOUT)
            assert result.returncode == 2, args
        dgram = subprocess.run(_argv(vm1, "--use-stdin-socket", "vm2", "x"), stdin=theirs,
                               capture_output=True, env=_env(vm1), timeout=TIMEOUT)
        assert dgram.returncode == 2 and b"SOCK_STREAM" in dgram.stderr


def test_buffer_size(vm1: VM, vm2: VM, host: Host) -> None:
    _service(host, "test.Echo", ECHO)
    for size in ("0", "1000", "4096", "0x100000", "0400000", "99999999"):
        result = _run(vm1, "--use-trigger-socket", f"--buffer-size={size}", "vm2",
                      "test.Echo", input=b"x")
        assert (result.returncode, result.stdout) == (0, b"arg=\nx"), (size, result.stderr)
    for bad, why in (("x1", b"does not begin with a number"), ("12k", b"trailing junk"),
                     ("99999999999", b"out of range")):
        result = _run(vm1, "--buffer-size", bad, "vm2", "test.Echo")
        assert result.returncode == 1 and why in result.stderr, bad


def test_help_and_usage(vm1: VM) -> None:
    assert _run(vm1, "-h").returncode == 0
    assert _run(vm1, "--help").returncode == 0
    assert _run(vm1, "dom0").returncode == 2
    assert _run(vm1, "--no-such-option", "vm2", "x").returncode == 2
