"""Full listen queues: our sockets listen with the system's largest backlog, and a
client meeting a full queue anyway waits for room (within its timeout) instead
of failing, or of taking an unconnected socket for a connected one as trio's
own connect does."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from _socket import socket as raw_socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from qrexec_trio import _sockets, _unix
from qrexec_trio._config import Timeouts
from qrexec_trio._sockets import (
    ListenQueueFull,
    connect_unix,
    connect_unix_blocking,
    listening_socket,
)
from qrexec_trio.blocking._vm_call import ClientVmError, _fdpass_socket
from qrexec_trio.blocking._vm_call import ask_agent as ask_agent_blocking
from qrexec_trio.protocol import ExecCmdline
from qrexec_trio.roles._client_vm_trio import ask_agent
from qrexec_trio.roles._connect import ConnectError, open_daemon_request

#: A short timeout where the test wants the give-up path.
GIVE_UP: float = 0.2


def _somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def _queue_one(path: str) -> socket.socket | None:
    """One raw non-blocking connect (the queue's slot it takes), or None if the queue is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except BlockingIOError:
        sock.close()
        return None
    return sock


@pytest.fixture
def full_listener(short_tmp: Path) -> Iterator[tuple[str, socket.socket]]:
    """A socket listening with the smallest backlog, never accepting, its queue full."""
    # Named as a daemon's socket, so that the daemon's clients can be pointed at it.
    path = str(short_tmp / "qrexec.full")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    queued: list[socket.socket] = []
    with contextlib.ExitStack() as stack:
        stack.callback(server.close)
        # listen(0) still queues one connection (or a few elsewhere): fill until refused.
        for _ in range(16):
            sock = _queue_one(path)
            if sock is None:
                break
            stack.callback(sock.close)
            queued.append(sock)
        else:
            pytest.fail("the listen queue never filled")
        assert queued, "listen(0) queued nothing"
        yield path, server


def _accept_all(server: socket.socket) -> list[socket.socket]:
    server.setblocking(False)
    accepted = []
    with contextlib.suppress(BlockingIOError):
        while True:
            accepted.append(server.accept()[0])
    return accepted


def _read_from_one_of(accepted: list[socket.socket], size: int) -> set[bytes]:
    """What each accepted connection has ready to read (b"" for nothing yet)."""
    found = set()
    for sock in accepted:
        sock.setblocking(False)
        try:
            found.add(sock.recv(size))
        except BlockingIOError:
            found.add(b"")
        sock.close()
    return found


# -- the backlog -----------------------------------------------------------------------


def test_the_backlog_is_the_systems_maximum() -> None:
    assert _somaxconn() == _sockets.BACKLOG


def test_a_burst_beyond_64_waits_in_the_queue_of_a_socket_that_does_not_accept(
        short_tmp: Path) -> None:
    burst = min(_somaxconn(), 256)
    path = str(short_tmp / "burst.sock")
    with listening_socket(path, mode=0o600), contextlib.ExitStack() as stack:
        for number in range(burst):
            sock = _queue_one(path)
            assert sock is not None, f"connection {number + 1} of {burst} met a full queue"
            stack.callback(sock.close)


# -- connect_unix ----------------------------------------------------------------------


async def test_connect_waits_for_room_in_a_full_queue_then_connects(
        full_listener: tuple[str, socket.socket]) -> None:
    path, server = full_listener
    connected: list[trio.SocketStream] = []

    async def connect() -> None:
        connected.append(await connect_unix(path, timeout=60))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            # The client tried, met the full queue, and waits: nothing else can happen.
            await trio.testing.wait_all_tasks_blocked()
            assert not connected
            server.accept()[0].close()  # room for one
        (stream,) = connected
        async with stream:
            await stream.send_all(b"hello")
            assert b"hello" in _read_from_one_of(_accept_all(server), 5)


async def test_connect_gives_up_after_its_timeout_with_a_clear_error(
        full_listener: tuple[str, socket.socket]) -> None:
    path, _ = full_listener
    with trio.fail_after(30), pytest.raises(ListenQueueFull) as caught:
        await connect_unix(path, timeout=GIVE_UP)
    error = caught.value
    assert isinstance(error, OSError)
    assert (error.errno, error.filename) == (errno.EAGAIN, path)
    assert "listen queue stayed full" in str(error.strerror)


async def test_connect_does_not_retry_other_errors(short_tmp: Path) -> None:
    missing = str(short_tmp / "missing.sock")
    with trio.fail_after(30), pytest.raises(FileNotFoundError):
        await connect_unix(missing, timeout=60)
    # Bound but not listening: nobody will ever accept, so no waiting either.
    path = str(short_tmp / "deaf.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as deaf:
        deaf.bind(path)
        with trio.fail_after(30), pytest.raises(ConnectionRefusedError):
            await connect_unix(path, timeout=60)


def test_blocking_connect_waits_for_room_then_connects(
        full_listener: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    path, server = full_listener
    met_full_queue = threading.Event()
    attempt = _unix.attempt_connect

    def observed_attempt(target: str, make: type[socket.socket]) -> socket.socket | None:
        sock = attempt(target, make)
        if sock is None:
            met_full_queue.set()
        return sock

    monkeypatch.setattr(_unix, "attempt_connect", observed_attempt)

    def make_room() -> None:
        if met_full_queue.wait(30):
            server.accept()[0].close()

    helper = threading.Thread(target=make_room)
    helper.start()
    try:
        sock = connect_unix_blocking(path, timeout=60)
    finally:
        helper.join()
    with sock:
        assert met_full_queue.is_set() and sock.getblocking()
        sock.sendall(b"hello")
        assert b"hello" in _read_from_one_of(_accept_all(server), 5)


def test_blocking_connect_gives_up_after_its_timeout(
        full_listener: tuple[str, socket.socket]) -> None:
    path, _ = full_listener
    with pytest.raises(ListenQueueFull) as caught:
        connect_unix_blocking(path, timeout=GIVE_UP)
    assert caught.value.errno == errno.EAGAIN


# -- the callers: a full queue is a clear error of their own kind, not a crash -----------


async def test_client_vm_trigger_reports_a_full_queue_as_its_error(
        full_listener: tuple[str, socket.socket]) -> None:
    path, _ = full_listener
    with trio.fail_after(30), pytest.raises(ClientVmError, match="listen queue stayed full"):
        await ask_agent(path, b"frame", Timeouts(handshake=GIVE_UP))


def test_the_blocking_client_vm_trigger_reports_a_full_queue_as_its_error(
        full_listener: tuple[str, socket.socket]) -> None:
    path, _ = full_listener
    with pytest.raises(ClientVmError, match="listen queue stayed full"):
        ask_agent_blocking(path, b"frame", Timeouts(handshake=GIVE_UP), raw_socket)


def test_client_vm_fdpass_reports_a_full_queue_as_its_error(
        full_listener: tuple[str, socket.socket]) -> None:
    path, _ = full_listener
    with pytest.raises(ClientVmError, match="listen queue stayed full"):
        _fdpass_socket(path, GIVE_UP, socket.socket)


async def test_a_daemon_request_reports_a_full_queue_as_a_connect_error(
        full_listener: tuple[str, socket.socket]) -> None:
    path, _ = full_listener
    request = ExecCmdline(0, 0, b"user:true")
    with trio.fail_after(30), pytest.raises(ConnectError, match="listen queue stayed full"):
        await open_daemon_request(os.path.dirname(path), "full", request,
                                  Timeouts(handshake=GIVE_UP))
