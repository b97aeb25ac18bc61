"""One trio wrapper for every ring-based vchan (Xen's libxenvchan, our shm ring).

A ring vchan is driven through libxenvchan's synchronous, non-blocking API
(:class:`RingDriver`): stream read/write that never block, ``data_ready`` and
``buffer_space`` (which also *arm* a notification from the peer), ``wait``
(consume one event; it blocks unless the event fd is readable) and
``fd_for_select``, the event-channel fd that becomes readable when the peer
signals. That fd is the trio wait point.

trio allows one waiter per fd, and a vchan has a single fd for everything
(data written, space freed, peer closed). So waiting is *pumped*: whichever
reader or writer needs to wait takes the pump lock, waits on the fd, calls
``wait()`` and wakes every other waiter, which then re-check their own
condition. A pump that stops waiting for any other reason (cancelled, or an
error) wakes them too, so that one of them takes the pump over. The pump is
therefore always a task of the connection that owns the vchan, never a
detached one, and there is never a second waiter on the fd. Each check arms
the notification *before* the wait, so a wake-up cannot be lost between the
check and the wait (libxenvchan's own rule).
"""

from __future__ import annotations

from typing import Final, Protocol, final

import trio

from ._interface import Vchan

_READ_CHUNK: Final = 65536 + 8


class RingDriver(Protocol):
    """libxenvchan's API, as both ring backends provide it (never blocking)."""

    def read_into(self, buffer: bytearray, size: int) -> int:
        """Up to ``size`` bytes into the start of ``buffer``: the count read; 0 if
        none now; -1 if the peer closed and everything it sent was read."""
        ...

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Bytes written (maybe fewer than given, maybe 0); -1 if the peer closed."""
        ...

    def data_ready(self) -> int:
        """Bytes readable now; arms "notify me when the peer writes"."""
        ...

    def buffer_space(self) -> int:
        """Bytes writable now; arms "notify me when the peer reads"."""
        ...

    def wait(self) -> None:
        """Consume one pending event (call only after the fd was readable);
        :class:`OSError` if the event channel failed."""
        ...

    def fd_for_select(self) -> int:
        """The event-channel fd."""
        ...

    def is_open(self) -> int:
        """0 closed (or the peer died), 1 open, 2 server still waiting for its client."""
        ...

    def close(self) -> None:
        """Tell the peer, release the ring; the fd is closed by this call."""
        ...


@final
class RingVchan(Vchan):
    """A connected ring vchan as a trio stream."""

    def __init__(self, driver: RingDriver, peer_domain: int, port: int,
                 *, send_finish: float = 2.0) -> None:
        self._driver = driver
        self._fd = driver.fd_for_select()
        self.peer_domain = peer_domain
        self.port = port
        self._send_finish = send_finish
        self._closed = False
        self._pump = trio.Lock()
        self._changed = trio.lowlevel.ParkingLot()
        self._send_busy = trio.Lock()
        self._receive_busy = trio.Lock()
        self._buffer = bytearray(_READ_CHUNK)

    # -- waiting ---------------------------------------------------------------------

    async def _wait_for_event(self) -> None:
        """Sleep until the peer signals (and let the others re-check too)."""
        if self._pump.locked():
            # Someone is already waiting on the fd: it wakes us when it fires,
            # or when it stops waiting for any other reason. Either way we
            # return to our caller's loop, which re-checks and, if it still has
            # to wait, takes the pump itself.
            await self._changed.park()
            return
        async with self._pump:
            try:
                try:
                    await trio.lowlevel.wait_readable(self._fd)
                except trio.ClosedResourceError:
                    if not self._closed:
                        raise
                if not self._closed:
                    self._consume_event()
            finally:
                # However we leave (event, cancellation, error), the parked
                # tasks must hear of it: with the pump gone, nobody else would
                # wake them when the peer signals.
                self._changed.unpark_all()

    def _consume_event(self) -> None:
        try:
            self._driver.wait()
        except OSError as exc:
            # The drivers raise plain OSError (they have no trio); for a stream
            # that is a broken one.
            raise trio.BrokenResourceError(f"vchan event channel failed: {exc}") from exc

    async def wait_connected(self, timeout: float) -> None:
        """Server side: wait until the client has connected (``is_open`` leaves 2)."""
        with trio.fail_after(timeout or float("inf")):
            while self._driver.is_open() == 2:
                await self._wait_for_event()
        await trio.lowlevel.checkpoint()

    # -- the stream --------------------------------------------------------------------

    def buffer_space(self) -> int:
        if self._closed:
            return 0
        return self._driver.buffer_space()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receive_busy.locked():
            raise trio.BusyResourceError("another task is receiving on this vchan")
        async with self._receive_busy:
            self._check_open()
            await trio.lowlevel.checkpoint_if_cancelled()
            size = min(max_bytes or _READ_CHUNK, _READ_CHUNK)
            while True:
                got = self._driver.read_into(self._buffer, size)
                if got > 0:
                    data = bytes(self._buffer[:got])
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if got < 0:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""  # the peer closed and everything it sent was read
                if self._driver.data_ready() == 0:  # arms the notification, re-checks
                    await self._wait_for_event()
                self._check_open()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy.locked():
            raise trio.BusyResourceError("another task is sending on this vchan")
        async with self._send_busy:
            self._check_open()
            view = memoryview(data).cast("B")
            await trio.lowlevel.checkpoint_if_cancelled()
            await self._write_untorn(view)
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _write_untorn(self, view: memoryview) -> None:
        """Write ``view``; a cancellation after part of it went out finishes it
        (shielded, within ``send_finish``) or closes the vchan: frames never tear."""
        progress = [0]
        try:
            await self._write_loop(view, progress)
        except trio.Cancelled:
            if progress[0] == 0:
                raise
            with trio.CancelScope(shield=True), trio.move_on_after(self._send_finish):
                await self._write_loop(view, progress)
            if progress[0] < len(view):
                self._abort()
            raise

    async def _write_loop(self, view: memoryview, progress: list[int]) -> None:
        while progress[0] < len(view):
            self._check_open()
            written = self._driver.write(view[progress[0]:])
            if written < 0:
                raise trio.BrokenResourceError("vchan peer has gone")
            progress[0] += written
            if progress[0] < len(view) and self._driver.buffer_space() == 0:
                await self._wait_for_event()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        while self._driver.buffer_space() == 0 and self._driver.is_open() == 1:
            await self._wait_for_event()
        await trio.lowlevel.checkpoint()

    # -- closing -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("vchan was closed")

    def _abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        # trio's rule for fds: tell waiters first, then let the C close free the fd.
        trio.lowlevel.notify_closing(self._fd)
        self._driver.close()
        self._changed.unpark_all()

    async def aclose(self) -> None:
        self._abort()
        await trio.lowlevel.checkpoint()
