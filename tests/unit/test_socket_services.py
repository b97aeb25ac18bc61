"""Socket and TCP services: planning (descriptor, ``/dev/tcp`` targets, every
refusal) and the service end against real local servers, through the pump.

The servers are real: a unix socket in a temporary directory and a TCP
listener on 127.0.0.1 (port 0, bound here). The caller is an in-memory
FramedLink peer, as in test_pump.
"""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from qrexec_trio._config import Timeouts
from qrexec_trio.nursery import FramedLink, open_service, serve_data
from qrexec_trio.nursery._service_end import just_exec_service
from qrexec_trio.protocol import (
    Data,
    Direction,
    Event,
    ExitCode,
    ExitStatus,
    MessageReader,
    Stream,
    parse_cmdline,
)
from qrexec_trio.services import LaunchError, Plan, ProgramPlan, Runner, SocketPlan
from qrexec_trio.services._lookup import tcp_address
from qrexec_trio.services._plan import TcpPlan
from qrexec_trio.services._service_config import ServiceConfig

TIMEOUTS = Timeouts(handshake=2.0)


def _plan(directory: Path, text: str, config: ServiceConfig | None = None) -> Plan:
    runner = Runner([str(directory)])
    cmdline = parse_cmdline(f"{pwd.getpwuid(os.geteuid()).pw_name}:{text}".encode())
    return runner.plan(cmdline) if config is None else runner.plan(cmdline, config)


# -- planning ----------------------------------------------------------------


def _bind_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


def test_descriptor_is_the_cmdline_after_qubesrpc_with_a_nul(tmp_path: Path) -> None:
    with _bind_unix(tmp_path / "test.Sock"):
        with_arg = _plan(tmp_path, "QUBESRPC test.Sock+arg dom0")
        without = _plan(tmp_path, "QUBESRPC test.Sock dom0")
        empty = _plan(tmp_path, "QUBESRPC test.Sock+ vm1")
    assert isinstance(with_arg, SocketPlan)
    assert with_arg.path == str(tmp_path / "test.Sock")
    assert with_arg.descriptor == b"test.Sock+arg dom0\0"  # i1
    assert isinstance(without, SocketPlan)
    assert without.descriptor == b"test.Sock dom0\0"  # no "+" added (j1)
    assert isinstance(empty, SocketPlan)
    assert empty.descriptor == b"test.Sock+ vm1\0"
    assert not with_arg.exit_on_client_eof and not with_arg.exit_on_service_eof


def test_config_skips_the_descriptor_and_carries_the_exit_flags(tmp_path: Path) -> None:
    config = ServiceConfig(skip_service_descriptor=True, exit_on_service_eof=True,
                           exit_on_client_eof=True)
    with _bind_unix(tmp_path / "test.Sock"):
        plan = _plan(tmp_path, "QUBESRPC test.Sock+arg dom0", config)
    assert isinstance(plan, SocketPlan)
    assert plan.descriptor == b""  # i2
    assert plan.exit_on_service_eof and plan.exit_on_client_eof


def test_config_socket_keys_do_not_change_an_executable_service(tmp_path: Path) -> None:
    service = tmp_path / "svc"
    service.write_text("#!/bin/sh\n")
    service.chmod(0o755)
    plan = _plan(tmp_path, "QUBESRPC svc dom0", ServiceConfig(skip_service_descriptor=True,
                                                               exit_on_service_eof=True))
    assert isinstance(plan, ProgramPlan)


@pytest.mark.parametrize(("link", "argument", "expected"), [
    ("/dev/tcp/127.0.0.1/39001", None, ("127.0.0.1", 39001)),
    ("/dev/tcp/127.0.0.1/39001", "", ("127.0.0.1", 39001)),
    ("/dev/tcp/127.0.0.1/65535", None, ("127.0.0.1", 65535)),
    ("/dev/tcp/127.0.0.1", "39002", ("127.0.0.1", 39002)),
    ("/dev/tcp", "127.0.0.1+1", ("127.0.0.1", 1)),
    ("/dev/tcp/::1/22", None, ("::1", 22)),
    ("/dev/tcp/[::1]/22", None, ("::1", 22)),
    ("/dev/tcp/[fe80::1]", "22", ("fe80::1", 22)),
    ("/dev/tcp", "++1+22", ("::1", 22)),
    ("/dev/tcp", "fe80++1+443", ("fe80::1", 443)),
    ("/dev/tcp", "2001+db8++1+22", ("2001:db8::1", 22)),
])
def test_dev_tcp_targets(link: str, argument: str | None, expected: tuple[str, int]) -> None:
    assert tcp_address(link, argument) == expected


@pytest.mark.parametrize(("link", "argument", "reason"), [
    # A port in the link and one in the argument: j3's log line, path cut at the port.
    ("/dev/tcp/127.0.0.1/39001", "arg", "Unexpected argument arg to service /dev/tcp/127.0.0.1"),
    ("/dev/tcp/127.0.0.1/39001", "39001", "Unexpected argument 39001"),
    ("/dev/tcp/", "127.0.0.1+22", "not followed by host"),
    ("/dev/tcp/127.0.0.1", None, "No or empty argument"),
    ("/dev/tcp/127.0.0.1", "", "No or empty argument"),
    ("/dev/tcp", None, "No or empty argument"),
    ("/dev/tcp", "", "No or empty argument"),
    ("/dev/tcp", "127.0.0.1", "No port provided"),
    ("/dev/tcp", "a_b+22", "Underscore not allowed"),
    ("/dev/tcp", "+22", "invalid host"),
    ("/dev/tcp", "localhost+22", "invalid host"),
    ("/dev/tcp/localhost/22", None, "invalid host"),
    ("/dev/tcp//22", None, "invalid host"),
    ("/dev/tcp/[127.0.0.1]/22", None, "invalid host"),
    ("/dev/tcp/[::1/22", None, "invalid host"),
    ("/dev/tcp/127.1/22", None, "invalid host"),
    ("/dev/tcp/127.0.0.1/0", None, "invalid port"),
    ("/dev/tcp/127.0.0.1/022", None, "invalid port"),
    ("/dev/tcp/127.0.0.1/65536", None, "invalid port"),
    ("/dev/tcp/127.0.0.1/123456", None, "invalid port"),
    ("/dev/tcp/127.0.0.1/", None, "invalid port"),
    ("/dev/tcp/127.0.0.1/22/x", None, "invalid port"),
    ("/dev/tcp/127.0.0.1/+22", None, "invalid port"),
    ("/dev/tcp/127.0.0.1/-1", None, "invalid port"),
    ("/dev/tcp/127.0.0.1/\u0663", None, "invalid port"),
    ("/dev/tcp/127.0.0.1", "127.0.0.1+22", "invalid port"),
    ("/dev/tcp", "127.0.0.1+22+", "invalid"),
])
def test_dev_tcp_refusals(link: str, argument: str | None, reason: str) -> None:
    with pytest.raises(LaunchError) as error:
        tcp_address(link, argument)
    assert error.value.status == ExitStatus.PROBLEM
    assert reason in error.value.reason


def test_symlink_to_dev_tcp_is_a_tcp_plan(tmp_path: Path) -> None:
    os.symlink("/dev/tcp/127.0.0.1", tmp_path / "test.Tcp2")
    os.symlink("/dev/tcp/127.0.0.1/39001", tmp_path / "test.Tcp")
    port_from_arg = _plan(tmp_path, "QUBESRPC test.Tcp2+39002 dom0")
    fixed = _plan(tmp_path, "QUBESRPC test.Tcp dom0")
    assert isinstance(port_from_arg, TcpPlan)
    assert (port_from_arg.host, port_from_arg.port) == ("127.0.0.1", 39002)
    assert port_from_arg.descriptor == b"test.Tcp2+39002 dom0\0"  # j2: argument kept
    assert port_from_arg.path == str(tmp_path / "test.Tcp2")
    assert isinstance(fixed, TcpPlan)
    assert fixed.descriptor == b"test.Tcp dom0\0"  # j1
    assert fixed.address == "127.0.0.1:39001"
    assert TcpPlan("::1", 22, b"").address == "[::1]:22"


def test_tcp_refusal_is_found_at_plan_time(tmp_path: Path) -> None:
    os.symlink("/dev/tcp/127.0.0.1/39001", tmp_path / "test.Tcp")
    with pytest.raises(LaunchError) as error:
        _plan(tmp_path, "QUBESRPC test.Tcp+arg dom0")  # j3
    assert error.value.status == ExitStatus.PROBLEM
    assert error.value.reason == "Unexpected argument arg to service /dev/tcp/127.0.0.1"


def test_specific_tcp_link_wins_and_other_symlinks_are_followed(tmp_path: Path) -> None:
    os.symlink("/dev/tcp/127.0.0.1", tmp_path / "svc+7")
    os.symlink(tmp_path / "missing", tmp_path / "svc+8")  # dangling: absent
    real = tmp_path / "real"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    os.symlink(real, tmp_path / "svc")
    tcp = _plan(tmp_path, "QUBESRPC svc+7 dom0")
    assert isinstance(tcp, TcpPlan) and tcp.port == 7
    assert isinstance(_plan(tmp_path, "QUBESRPC svc+8 dom0"), ProgramPlan)
    os.unlink(tmp_path / "svc")
    with pytest.raises(LaunchError) as error:
        _plan(tmp_path, "QUBESRPC svc+8 dom0")
    assert error.value.status == ExitStatus.SERVICE_NOT_FOUND


# -- the service end, through serve_data ---------------------------------------


class Caller:
    """The test's end of the data vchan, playing the caller."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = MessageReader(Direction.SERVICE_TO_CALLER, version=4)

    async def stdin(self, data: bytes) -> None:
        await self.stream.send_all(Data(Stream.STDIN, data).encode())

    async def events(self) -> list[Event]:
        got: list[Event] = []
        while data := await self.stream.receive_some(65536):
            self.reader.feed(data)
            while (event := self.reader.next_event()) is not None:
                got.append(event)
        return got


def _stdout(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data) and e.stream is Stream.STDOUT)


Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def unix_server(path: Path, handler: Handler) -> AsyncIterator[None]:
    listener = trio.socket.socket(socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen(1)
    async with trio.open_nursery() as nursery:

        async def serve_one() -> None:
            conn, _ = await listener.accept()
            async with trio.SocketStream(conn) as stream:
                await handler(stream)

        nursery.start_soon(serve_one)
        yield
    listener.close()


@asynccontextmanager
async def tcp_server(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[int]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = trio.socket.socket(family)
    await listener.bind((host, 0))
    listener.listen(1)
    async with trio.open_nursery() as nursery:

        async def serve_one() -> None:
            conn, _ = await listener.accept()
            async with trio.SocketStream(conn) as stream:
                await handler(stream)

        nursery.start_soon(serve_one)
        yield listener.getsockname()[1]
    listener.close()


async def read_until_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


async def read_descriptor(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """The descriptor up to its NUL, and whatever came after it in the same reads."""
    data = b""
    while b"\0" not in data:
        chunk = await stream.receive_some()
        assert chunk, f"EOF before the descriptor's NUL: {data!r}"
        data += chunk
    descriptor, _, rest = data.partition(b"\0")
    return descriptor + b"\0", rest


async def run_call(plan: SocketPlan | TcpPlan, caller_script: Callable[[Caller], Awaitable[None]],
                   ) -> tuple[int, list[Event]]:
    """serve_data for ``plan`` against an in-memory caller running ``caller_script``."""
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.CALLER_TO_SERVICE, version=4)
    caller = Caller(theirs)
    events: list[Event] = []
    status = -1
    async with trio.open_nursery() as nursery:

        async def collect() -> None:
            events.extend(await caller.events())

        nursery.start_soon(collect)
        nursery.start_soon(caller_script, caller)
        async with open_service(plan, TIMEOUTS) as end:
            status = await serve_data(link, end)
        await ours.aclose()
        nursery.cancel_scope.deadline = trio.current_time() + 5
    return status, events


async def _ping_and_eof(caller: Caller) -> None:
    await caller.stdin(b"ping\n")
    await caller.stdin(b"")


async def test_socket_service_i1(tmp_path: Path) -> None:
    seen: dict[str, bytes] = {}

    async def echo(stream: trio.SocketStream) -> None:
        seen["descriptor"], rest = await read_descriptor(stream)
        seen["input"] = rest + await read_until_eof(stream)  # ends at our half-close
        await stream.send_all(seen["input"])

    path = tmp_path / "test.Sock"
    async with unix_server(path, echo):
        plan = _plan(tmp_path, "QUBESRPC test.Sock+arg dom0")
        assert isinstance(plan, SocketPlan)
        status, events = await run_call(plan, _ping_and_eof)
    assert status == 0
    assert seen == {"descriptor": b"test.Sock+arg dom0\0", "input": b"ping\n"}
    assert events[0] == Data(Stream.STDERR, b""), "no stderr: its EOF goes first"
    assert events[-2:] == [Data(Stream.STDOUT, b""), ExitCode(0)]
    assert _stdout(events) == b"ping\n"
    assert [e for e in events if isinstance(e, Data) and e.stream is Stream.STDERR] == [
        Data(Stream.STDERR, b"")]


async def test_socket_service_skip_descriptor_i2(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def echo(stream: trio.SocketStream) -> None:
        data = await read_until_eof(stream)
        seen.append(data)
        await stream.send_all(data)

    async with unix_server(tmp_path / "test.Sock", echo):
        plan = _plan(tmp_path, "QUBESRPC test.Sock+arg dom0",
                     ServiceConfig(skip_service_descriptor=True))
        status, events = await run_call(plan, _ping_and_eof)
    assert status == 0
    assert seen == [b"ping\n"]
    assert _stdout(events) == b"ping\n"


async def test_exit_on_service_eof_ends_the_call_with_stdin_open_i3(tmp_path: Path) -> None:
    service_saw_eof = trio.Event()
    exit_code_sent = trio.Event()
    order: list[str] = []

    async def bye(stream: trio.SocketStream) -> None:
        await read_descriptor(stream)
        await stream.send_all(b"bye\n")
        await stream.send_eof()
        assert await read_until_eof(stream) == b""
        order.append("service saw EOF")
        service_saw_eof.set()

    async with unix_server(tmp_path / "test.Sock", bye):
        plan = _plan(tmp_path, "QUBESRPC test.Sock+arg dom0",
                     ServiceConfig(exit_on_service_eof=True))
        ours, theirs = trio.testing.memory_stream_pair()
        link = FramedLink(ours, Direction.CALLER_TO_SERVICE, version=4)
        caller = Caller(theirs)
        async with trio.open_nursery() as nursery:
            got: list[Event] = []

            async def collect() -> None:
                got.extend(await caller.events())

            nursery.start_soon(collect)
            with trio.fail_after(5):
                async with open_service(plan, TIMEOUTS) as end:
                    assert await serve_data(link, end) == 0
                    order.append("exit code sent")
                    exit_code_sent.set()
                    # No half-close before EXIT_CODE: the service has not seen EOF.
                    await trio.testing.wait_all_tasks_blocked()
                    assert not service_saw_eof.is_set()
                await service_saw_eof.wait()
            await ours.aclose()
    assert order == ["exit code sent", "service saw EOF"]
    assert got[0] == Data(Stream.STDERR, b"")
    assert got[-2:] == [Data(Stream.STDOUT, b""), ExitCode(0)]
    assert _stdout(got) == b"bye\n"


async def test_default_waits_for_the_callers_eof_after_the_service_eof(tmp_path: Path) -> None:
    seen_eof = trio.Event()

    async def bye(stream: trio.SocketStream) -> None:
        await read_descriptor(stream)
        await stream.send_all(b"bye\n")
        await stream.send_eof()  # output done; still reading
        assert await read_until_eof(stream) == b"late\n"
        seen_eof.set()

    async def caller_script(caller: Caller) -> None:
        await trio.sleep(0.2)  # the service's output ended long ago
        assert not finished.is_set(), "the call ended while the caller's input was open"
        await caller.stdin(b"late\n")
        await caller.stdin(b"")

    finished = trio.Event()
    async with unix_server(tmp_path / "test.Sock", bye):
        plan = _plan(tmp_path, "QUBESRPC test.Sock dom0")
        assert isinstance(plan, SocketPlan)

        async def script(caller: Caller) -> None:
            await caller_script(caller)

        with trio.fail_after(5):
            status, events = await run_call(plan, script)
        finished.set()
    assert status == 0
    assert seen_eof.is_set()
    assert _stdout(events) == b"bye\n"
    assert events[-1] == ExitCode(0)


async def test_default_ends_when_the_service_closes_its_socket(tmp_path: Path) -> None:
    async def answer_and_close(stream: trio.SocketStream) -> None:
        await read_descriptor(stream)
        await stream.send_all(b"done\n")
        # closing it (both directions) is a hang-up for the agent

    async def never_eof(caller: Caller) -> None:
        await caller.stdin(b"x")

    async with unix_server(tmp_path / "test.Sock", answer_and_close):
        plan = _plan(tmp_path, "QUBESRPC test.Sock dom0")
        assert isinstance(plan, SocketPlan)
        with trio.fail_after(5):
            status, events = await run_call(plan, never_eof)
    assert status == 0
    assert _stdout(events) == b"done\n"
    assert events[-1] == ExitCode(0)


async def test_exit_on_client_eof_ends_at_the_callers_eof(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def silent(stream: trio.SocketStream) -> None:
        # Never writes, never closes: reads until the agent closes the socket.
        received.append(await read_until_eof(stream))

    async def data_then_eof(caller: Caller) -> None:
        await caller.stdin(b"stdin data")
        await caller.stdin(b"")

    async with unix_server(tmp_path / "test.Sock", silent):
        plan = _plan(tmp_path, "QUBESRPC test.Sock+arg2 dom0",
                     ServiceConfig(skip_service_descriptor=True, exit_on_client_eof=True))
        with trio.fail_after(5):
            status, events = await run_call(plan, data_then_eof)
    assert status == 0
    # The reference's own test: exactly these three messages.
    assert events == [Data(Stream.STDERR, b""), Data(Stream.STDOUT, b""), ExitCode(0)]
    assert received == [b"stdin data"]


async def test_tcp_service_j1(tmp_path: Path) -> None:
    seen: dict[str, bytes] = {}

    async def echo(stream: trio.SocketStream) -> None:
        seen["descriptor"], rest = await read_descriptor(stream)
        data = rest + await read_until_eof(stream)
        await stream.send_all(data)

    async with tcp_server(echo) as port:
        os.symlink(f"/dev/tcp/127.0.0.1/{port}", tmp_path / "test.Tcp")
        plan = _plan(tmp_path, "QUBESRPC test.Tcp dom0")
        assert isinstance(plan, TcpPlan)
        with trio.fail_after(5):
            status, events = await run_call(plan, _ping_and_eof)
    assert status == 0
    assert seen["descriptor"] == b"test.Tcp dom0\0"
    assert events[0] == Data(Stream.STDERR, b"")
    assert _stdout(events) == b"ping\n"
    assert events[-2:] == [Data(Stream.STDOUT, b""), ExitCode(0)]


async def test_tcp_service_port_from_argument_j2(tmp_path: Path) -> None:
    seen: dict[str, bytes] = {}

    async def echo(stream: trio.SocketStream) -> None:
        seen["descriptor"], rest = await read_descriptor(stream)
        await stream.send_all(rest + await read_until_eof(stream))

    async with tcp_server(echo) as port:
        os.symlink("/dev/tcp/127.0.0.1", tmp_path / "test.Tcp2")
        plan = _plan(tmp_path, f"QUBESRPC test.Tcp2+{port} dom0")
        with trio.fail_after(5):
            status, events = await run_call(plan, _ping_and_eof)
    assert status == 0
    assert seen["descriptor"] == f"test.Tcp2+{port} dom0\0".encode()
    assert _stdout(events) == b"ping\n"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
async def test_tcp_service_over_ipv6_host_and_port_from_argument(tmp_path: Path) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        await stream.send_all(await read_until_eof(stream))

    async with tcp_server(echo, host="::1") as port:
        os.symlink("/dev/tcp", tmp_path / "svc")
        plan = _plan(tmp_path, f"QUBESRPC svc+++1+{port} dom0",
                     ServiceConfig(skip_service_descriptor=True))
        assert isinstance(plan, TcpPlan) and plan.host == "::1"
        with trio.fail_after(5):
            status, events = await run_call(plan, _ping_and_eof)
    assert status == 0
    assert _stdout(events) == b"ping\n"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens there once closed


async def test_tcp_connection_refused_is_a_launch_error(tmp_path: Path) -> None:
    os.symlink(f"/dev/tcp/127.0.0.1/{_closed_port()}", tmp_path / "svc")
    plan = _plan(tmp_path, "QUBESRPC svc dom0")
    with pytest.raises(LaunchError) as error:
        async with open_service(plan, TIMEOUTS):
            pytest.fail("connected to a closed port")
    assert error.value.status == ExitStatus.PROBLEM
    assert "Connection refused" in error.value.reason


async def test_socket_gone_since_planning_is_a_launch_error(tmp_path: Path) -> None:
    with _bind_unix(tmp_path / "test.Sock"):
        plan = _plan(tmp_path, "QUBESRPC test.Sock dom0")
    with pytest.raises(LaunchError) as error:
        async with open_service(plan, TIMEOUTS):
            pytest.fail("connected to a socket nobody listens on")
    assert error.value.status == ExitStatus.PROBLEM
    assert "socket service" in error.value.reason


async def test_a_server_that_never_accepts_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "test.Sock"
    with _bind_unix(path) as listener:
        listener.listen(0)
        # Fill the backlog: the next connect can only wait.
        fillers = []
        for _ in range(4):
            filler = socket.socket(socket.AF_UNIX)
            filler.setblocking(False)
            try:
                filler.connect(str(path))
            except BlockingIOError:
                filler.close()
                break
            fillers.append(filler)
        plan = _plan(tmp_path, "QUBESRPC test.Sock dom0")
        start = trio.current_time()
        with pytest.raises(LaunchError) as error:
            async with open_service(plan, Timeouts(handshake=0.3)):
                pytest.fail("connected to a server that never accepts")
        for filler in fillers:
            filler.close()
    assert error.value.status == ExitStatus.PROBLEM
    assert "no answer within 0.3s" in error.value.reason
    assert trio.current_time() - start < 3


async def test_just_exec_sends_the_descriptor_and_leaves(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        received.append(await read_until_eof(stream))

    async with unix_server(tmp_path / "svc+", record):
        plan = _plan(tmp_path, "QUBESRPC svc a")
        assert isinstance(plan, SocketPlan)
        with trio.fail_after(5):
            await just_exec_service(plan, TIMEOUTS)
    assert received == [b"svc a\0"]

    skipped: list[bytes] = []

    async def record_skipped(stream: trio.SocketStream) -> None:
        skipped.append(await read_until_eof(stream))

    async with tcp_server(record_skipped) as port:
        os.symlink(f"/dev/tcp/127.0.0.1/{port}", tmp_path / "tcp")
        plan = _plan(tmp_path, "QUBESRPC tcp dom0", ServiceConfig(skip_service_descriptor=True))
        with trio.fail_after(5):
            await just_exec_service(plan, TIMEOUTS)
    assert skipped == [b""]


async def test_just_exec_of_an_unreachable_service_is_a_launch_error(tmp_path: Path) -> None:
    os.symlink(f"/dev/tcp/127.0.0.1/{_closed_port()}", tmp_path / "svc")
    plan = _plan(tmp_path, "QUBESRPC svc dom0")
    assert isinstance(plan, TcpPlan)
    with pytest.raises(LaunchError) as error:
        await just_exec_service(plan, TIMEOUTS)
    assert error.value.status == ExitStatus.PROBLEM
