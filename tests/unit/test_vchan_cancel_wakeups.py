"""A waiter that is cancelled (or fails) must not strand the other waiters of its vchan.

The ring backends (shm, xen) have one event fd per vchan, so one waiting task
(the pump) waits on it and the others park until it wakes them. These
scenarios cancel the pump while another task is parked, then make the peer
do what the parked task waits for: the parked task must finish. They run on
every backend (the socket backend has no pump, but must behave the same);
xen only where there is a Xen domain. A hang is failed by ``fail_after``,
never by a timing assertion.
"""

# ruff: noqa: F811

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from qrexec_trio.xen import Vchan
from qrexec_trio.xen._ring import RingVchan

from .test_shm_ring import Pair, _quiet

# The conformance suite's fixture, so these run on exactly the backends it runs on
# (pytest passes it to the tests by name: ruff takes those for redefinitions).
from .test_vchan_conformance import Backends, _pair, backends  # noqa: F401

#: Bounds every scenario: far longer than any of them needs, so only a hang trips it.
HANG: float = 10
RING = 4096


async def _start_blocked(nursery: trio.Nursery,
                         operation: Callable[[], Awaitable[object]]) -> trio.CancelScope:
    """Run ``operation`` in a task of its own cancel scope; return once it waits."""
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await operation()

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return scope


async def _cancel(scope: trio.CancelScope) -> None:
    """Cancel a waiter and let it finish leaving before the peer acts."""
    scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert scope.cancelled_caught


async def _fill(vchan: Vchan) -> int:
    """Send one-byte frames until the way to the peer is full; how many went.

    One byte at a time, so the send that blocks has sent nothing and its
    cancellation leaves no frame to finish.
    """
    count = 0

    async def keep_sending() -> None:
        nonlocal count
        while True:
            await vchan.send_all(b"f")
            count += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_sending)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return count


async def _receive_exactly(vchan: Vchan, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await vchan.receive_some(size - len(got))
        assert chunk, "end of file before all the data came"
        got += chunk
    return bytes(got)


async def _close(*vchans: Vchan) -> None:
    for vchan in vchans:
        await vchan.aclose()


async def test_a_sender_parked_behind_a_cancelled_receiver_finishes(backends: Backends) -> None:
    server, client = await _pair(backends, 720, ring=RING)
    payload = os.urandom(1 << 20)  # more than any ring or socket buffer holds
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            receiving = await _start_blocked(nursery, client.receive_some)
            nursery.start_soon(client.send_all, payload)  # fills the way, then waits
            await trio.testing.wait_all_tasks_blocked()
            await _cancel(receiving)
            assert await _receive_exactly(server, len(payload)) == payload
    await _close(client, server)


async def test_a_receiver_parked_behind_a_cancelled_sender_gets_the_data(
        backends: Backends) -> None:
    server, client = await _pair(backends, 721, ring=RING)
    queued = await _fill(client)
    received: list[bytes] = []
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            sending = await _start_blocked(nursery, lambda: client.send_all(b"more"))

            async def receive() -> None:
                received.append(await client.receive_some(100))

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await _cancel(sending)
            await server.send_all(b"wake")
        # The cancelled send sent nothing: the peer reads exactly the filler.
        assert await _receive_exactly(server, queued) == b"f" * queued
    assert received == [b"wake"]
    await _close(client, server)


async def test_a_wait_for_space_parked_behind_a_cancelled_receiver_wakes(
        backends: Backends) -> None:
    server, client = await _pair(backends, 722, ring=RING)
    queued = await _fill(client)
    woke = trio.Event()

    async def wait_for_space() -> None:
        await client.wait_send_all_might_not_block()
        woke.set()

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            receiving = await _start_blocked(nursery, client.receive_some)
            nursery.start_soon(wait_for_space)
            await trio.testing.wait_all_tasks_blocked()
            await _cancel(receiving)
            assert await _receive_exactly(server, queued) == b"f" * queued
            await woke.wait()
    await _close(client, server)


async def test_the_vchan_still_works_after_the_pump_was_cancelled(backends: Backends) -> None:
    server, client = await _pair(backends, 723, ring=RING)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            receiving = await _start_blocked(nursery, client.receive_some)
            await _cancel(receiving)
        await server.send_all(b"ping")
        assert await client.receive_some(10) == b"ping"
        await client.send_all(b"pong")
        assert await server.receive_some(10) == b"pong"
    await _close(client, server)


class _WaitFailsOnce:
    """A ring driver whose first ``wait`` fails (as a real one can, with an errno)."""

    def __init__(self, driver: object) -> None:
        self._driver = driver
        self.failed = False

    def wait(self) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EIO, "injected wait failure")
        self._driver.wait()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._driver, name)


async def test_a_sender_parked_behind_a_failed_receiver_finishes() -> None:
    """The pump's wait raising (not cancelled) must wake the parked tasks too.

    Only the ring wrapper has a pump; the shm driver stands in for any ring.
    """
    pair = Pair(RING, RING)
    _quiet(pair)  # no event left from the setup: the pump's first wait is the peer's read
    flaky = _WaitFailsOnce(pair.client)
    client = RingVchan(flaky, 0, 724)  # type: ignore[arg-type]
    server = RingVchan(pair.server, 42, 724)
    payload = os.urandom(4 * RING)
    try:
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    # A failed event channel is a broken stream (both drivers say OSError).
                    with pytest.raises(trio.BrokenResourceError, match="injected"):
                        await client.receive_some()

                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(client.send_all, payload)
                await trio.testing.wait_all_tasks_blocked()
                assert not flaky.failed  # both wait: the receiver on the fd, the sender parked
                # Reading frees space: the receiver (the pump) wakes and fails.
                assert await _receive_exactly(server, len(payload)) == payload
        assert flaky.failed
    finally:
        await _close(client, server)
        pair.close()
