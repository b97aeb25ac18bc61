"""The sd_notify notifier: parsing what systemd hands us, and sending it datagrams."""

from __future__ import annotations

import contextlib
import functools
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs
from trio.testing import MockClock, wait_all_tasks_blocked

from qrexec_trio._systemd import (
    Notifier,
    monotonic_usec,
    notify_address,
    watchdog_interval,
)
from qrexec_trio.nursery import ConnectionRegistry
from qrexec_trio.roles._cli import Lifecycle


@pytest.fixture
def listener(short_tmp: Path) -> Iterator[tuple[socket.socket, str]]:
    """systemd's side: a datagram socket, and its path."""
    path = str(short_tmp / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def test_address_forms() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract/name") == "\0abstract/name"
    assert notify_address("relative") is None
    assert notify_address("vsock:2:1234") is None


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("2000000", None, 1.0),
    ("30000000", "4242", 15.0),
    ("1", None, 0.0000005),
    ("2000000", "4243", None),  # another process's watchdog
])
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    assert watchdog_interval(usec, pid, 4242) == expected


@pytest.mark.parametrize(("usec", "pid"), [
    ("", None), ("ten", None), ("0", None), ("-5", None), ("1.5", None),
    ("2000000", "me"),
])
def test_watchdog_interval_refuses_bad_values(usec: str, pid: str | None) -> None:
    with pytest.raises(ValueError):
        watchdog_interval(usec, pid, 4242)


def test_from_environ_takes_the_variables_out(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "77",
           "OTHER": "x"}
    notifier = Notifier.from_environ(env, pid=77)
    assert notifier.address == path and notifier.watchdog == 2.0
    assert env == {"OTHER": "x"}  # a service started later inherits none of them
    kept = {"NOTIFY_SOCKET": path}
    Notifier.from_environ(kept, unset=False)
    assert kept == {"NOTIFY_SOCKET": path}


@pytest.mark.parametrize("usec", ["ten", "0", "-1", ""])
def test_bad_watchdog_usec_means_no_watchdog_and_one_log_line(
        listener: tuple[socket.socket, str], usec: str) -> None:
    _, path = listener
    with capture_logs() as logs:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": usec}, pid=1)
    assert notifier.watchdog is None and notifier.enabled
    assert [entry["event"] for entry in logs] == ["watchdog disabled"]


def test_watchdog_without_a_notify_socket_is_disabled() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"}, pid=1)
    assert notifier.watchdog is None and not notifier.enabled
    assert [entry["event"] for entry in logs] == ["watchdog disabled"]


def test_unset_notify_socket_is_a_silent_no_op() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environ({})
        assert not notifier.ready()
        assert not notifier.status("x")
        assert not notifier.ping()
        assert not notifier.stopping("bye")
    assert logs == []
    assert notifier._sock is None  # not even a socket made


def test_messages(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    assert notifier.ready()
    assert sock.recv(256) == b"READY=1"
    assert notifier.ping()
    assert sock.recv(256) == b"WATCHDOG=1"
    assert notifier.stopping("stopping; 1 live connection")
    assert sock.recv(256) == b"STOPPING=1\nSTATUS=stopping; 1 live connection"
    before = monotonic_usec()
    assert notifier.reloading()
    reloading, stamp = sock.recv(256).decode().split("\n")
    assert reloading == "RELOADING=1"
    key, value = stamp.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= monotonic_usec()
    notifier.close()


def test_abstract_socket() -> None:
    name = f"qrexec-trio-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    with sock:
        env = {"NOTIFY_SOCKET": f"@{name}"}
        notifier = Notifier.from_environ(env)
        assert notifier.ready()
        assert sock.recv(256) == b"READY=1"
        notifier.close()


def test_status_is_rate_limited_and_sent_only_on_change(
        listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path, status_interval=1.0)
    assert notifier.status("1 live", now=100.0)
    assert not notifier.status("2 live", now=100.5)  # too soon
    assert not notifier.status("1 live", now=101.5)  # no change
    assert notifier.status("3 live", now=101.6)
    assert notifier.status("3 live", now=101.7, force=True)
    sock.setblocking(False)
    assert [sock.recv(256), sock.recv(256), sock.recv(256)] == [
        b"STATUS=1 live", b"STATUS=3 live", b"STATUS=3 live"]
    with pytest.raises(BlockingIOError):
        sock.recv(256)


def test_missing_socket_logs_once_and_recovers(short_tmp: Path) -> None:
    path = str(short_tmp / "later")
    notifier = Notifier(path)
    with capture_logs() as logs:
        for _ in range(5):
            assert not notifier.ping()
    assert [entry["event"] for entry in logs] == [
        "cannot notify systemd; notifications dropped"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    with sock, capture_logs() as logs:
        assert notifier.ping()
        assert sock.recv(256) == b"WATCHDOG=1"
    assert [entry["event"] for entry in logs] == ["notifying systemd again"]
    notifier.close()


def test_refusing_socket_drops_without_blocking(short_tmp: Path) -> None:
    """A path that is no datagram socket (here a stream listener) refuses: dropped, at once."""
    path = str(short_tmp / "stream")
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(path)
    stream.listen()
    with stream, capture_logs() as logs:
        notifier = Notifier(path)
        assert not notifier.ready()
        assert not notifier.ready()
    assert len(logs) == 1 and logs[0]["log_level"] == "warning"
    notifier.close()


def test_full_socket_drops_instead_of_blocking(listener: tuple[socket.socket, str]) -> None:
    """systemd not reading: the notifier must never block the event loop."""
    _, path = listener
    notifier = Notifier(path)
    with capture_logs():
        # Bounded: a unix datagram queue holds a few hundred messages at most.
        sent = [notifier.send("X" * 1000) for _ in range(5000)]
    assert sent[0] and not sent[-1]
    notifier.close()


def test_monotonic_usec_is_the_monotonic_clock() -> None:
    assert abs(monotonic_usec() / 1e6 - time.monotonic()) < 5


# -- the lifecycle of a long-lived program (roles._cli) ---------------------------------

def lifecycle(path: str | None = None, grace: float = 10.0) -> Lifecycle:
    return Lifecycle(Notifier(path), stop_grace=grace, cleanup=1.0)


async def test_status_counts_live_connections() -> None:
    life = lifecycle()
    registry = ConnectionRegistry(cleanup_timeout=1)
    life.track(registry)
    assert life.status_text() == "serving; 0 live connections"
    async with registry.open("a", kind="service") as first:
        first.running()
        async with registry.open("b", kind="client"):
            assert life.status_text() == "serving; 2 live connections (1 running, 1 setup)"
        life.stop_requested.set()
        assert life.status_text() == "stopping; 1 live connection (1 running)"


async def run_stopped(life: Lifecycle, call: Callable[[], Awaitable[None]]) -> list[str]:
    """Run ``call`` as a connection of a program under ``life``, stop it once it is live."""
    registry = ConnectionRegistry(cleanup_timeout=1)
    life.track(registry)
    said: list[str] = []

    async def program(life: Lifecycle) -> int:
        async with trio.open_nursery() as nursery:
            async def connection() -> None:
                async with registry.open("call", kind="service") as conn:
                    await call()
                said.append("cancelled" if conn.cancelled else "finished")

            nursery.start_soon(connection)
            await wait_all_tasks_blocked()
            life.ready()
            life._stop(nursery, signal.SIGTERM)
            await trio.sleep_forever()
        return 0

    assert await life._run(program, []) == 0
    return said


async def test_a_stop_lets_a_connection_finish_within_the_grace(
        autojump_clock: MockClock) -> None:
    life = lifecycle(grace=10)
    started = trio.current_time()
    assert await run_stopped(life, functools.partial(trio.sleep, 5)) == ["finished"]
    assert 5 <= trio.current_time() - started < 10
    assert life.stop_signal == signal.SIGTERM


async def test_a_stop_cancels_a_connection_past_the_grace(autojump_clock: MockClock) -> None:
    life = lifecycle(grace=2)
    started = trio.current_time()
    with capture_logs() as logs:
        assert await run_stopped(life, trio.sleep_forever) == ["cancelled"]
    assert 2 <= trio.current_time() - started < 5
    assert "stop deadline passed; cancelling live connections" in [e["event"] for e in logs]


async def test_stop_and_reload_notify(listener: tuple[socket.socket, str],
                                      autojump_clock: MockClock) -> None:
    sock, path = listener
    sock.setblocking(False)
    life = lifecycle(path)
    reloads: list[int] = []

    async def reload() -> str:
        reloads.append(1)
        await trio.lowlevel.checkpoint()
        return "policy"

    life.on_reload(reload)
    stopped: list[bool] = []
    life.on_stop(lambda: stopped.append(True))
    life.ready()
    await life._reload_now()
    async with trio.open_nursery() as nursery:
        with life._main_scope:
            life._stop(nursery, signal.SIGTERM)  # nothing live: at once
            await trio.sleep_forever()
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(sock.recv(256).decode().split("\n")[0])
    assert got == ["READY=1", "STATUS=serving", "RELOADING=1", "READY=1", "STATUS=serving",
                   "STOPPING=1"]
    assert reloads == [1] and stopped == [True]


def test_a_dropped_status_is_sent_again_once_the_queue_has_room(
        listener: tuple[socket.socket, str]) -> None:
    """A full queue (systemd busy, many watchdog pings) must not leave a stale
    status for good: the status loop's next tick sends it."""
    sock, path = listener
    notifier = Notifier(path)
    with capture_logs():
        while notifier.ping():  # fill the queue
            pass
        assert not notifier.status("1 live", now=100.0)
        sock.setblocking(False)
        while True:  # systemd catches up
            try:
                sock.recv(256)
            except BlockingIOError:
                break
        assert notifier.status("1 live", now=101.0)
    assert sock.recv(256) == b"STATUS=1 live"
    notifier.close()


def test_a_status_dropped_with_stopping_is_not_taken_as_said(
        listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    with capture_logs():
        while notifier.ping():  # fill the queue
            pass
        assert not notifier.stopping("stopping; 1 live connection")
        sock.setblocking(False)
        while True:
            try:
                sock.recv(256)
            except BlockingIOError:
                break
        assert notifier.status("stopping; 1 live connection", now=time.monotonic() + 10)
    assert sock.recv(256) == b"STATUS=stopping; 1 live connection"
    notifier.close()
