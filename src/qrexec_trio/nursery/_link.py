"""A framed link: the thin trio driver around :class:`~qrexec_trio.protocol.MessageReader`.

It owns a stream (a vchan or a unix socket), turns received bytes into typed
events and serialises senders, so that two tasks of one connection can both
send on it without interleaving their frames.
"""

from __future__ import annotations

from typing import Final, final

import trio

from ..protocol import (
    DATA_RING_SIZE,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    Direction,
    Event,
    Hello,
    MessageReader,
    RemoteProtocolError,
    max_data_chunk,
    negotiate_version,
)
from ..xen import Vchan, VchanBackend

_RECEIVE_SIZE: Final = 65536 + 8


@final
class FramedLink:
    """Messages over a stream. ``receives`` is the direction of what we read."""

    def __init__(
        self, stream: trio.abc.Stream, receives: Direction, *, version: int | None = None
    ) -> None:
        self.stream = stream
        self._reader = MessageReader(receives, version)
        self._send_lock = trio.Lock()

    @property
    def version(self) -> int | None:
        return self._reader.version

    @version.setter
    def version(self, value: int) -> None:
        self._reader.version = value

    def data_chunk_size(self) -> int:
        """The largest data payload to send now: the chunk limit, or the free ring space."""
        limit = max_data_chunk(self.version or 2)
        if isinstance(self.stream, Vchan):
            limit = min(limit, self.stream.buffer_space() - HEADER_SIZE)
        return max(1, limit)

    async def send(self, event: Event) -> None:
        """Send one message; concurrent senders queue up, frames never interleave."""
        await self.send_frames(event.encode())

    async def send_frames(self, frames: bytes) -> None:
        """Send whole frames encoded already (by the sans-IO layer), as :meth:`send` does."""
        async with self._send_lock:
            await self.stream.send_all(frames)

    async def receive(self) -> Event | None:
        """The next event, or ``None`` if the peer closed between messages.

        Raises :class:`RemoteProtocolError` for anything the peer may not send,
        and for a stream that ends inside a message;
        :class:`~qrexec_trio.protocol.UndecodableMessage` (one of those) for a
        well-framed message with a bad payload, after which the link is still
        in step.
        """
        while True:
            event = self._reader.next_event()
            if event is not None:
                await trio.lowlevel.checkpoint()
                return event
            if self._reader.at_clean_eof:
                await trio.lowlevel.checkpoint()
                return None
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if data:
                self._reader.feed(data)
            else:
                self._reader.feed_eof()

    async def send_hello(self, version: int) -> None:
        await self.send(Hello(version))

    async def receive_hello(self) -> int:
        """The peer's version from its HELLO (the reader insists HELLO comes first)."""
        event = await self.receive()
        if event is None:
            raise RemoteProtocolError("hello", "peer closed before its HELLO")
        assert isinstance(event, Hello)  # the reader lets nothing else through first
        return event.version

    async def exchange_hello(self, own: int, *, send_first: bool = True, minimum: int = 2) -> int:
        """Both sides send their version and use the lower one (data vchans, client socket)."""
        if send_first:
            await self.send_hello(own)
            peer = await self.receive_hello()
        else:
            peer = await self.receive_hello()
            await self.send_hello(own)
        version = negotiate_version(own, peer, minimum)
        self.version = version
        return version

    def take_buffered(self) -> bytes:
        """Bytes already read past the last message (see ``MessageReader.take_buffered``)."""
        return self._reader.take_buffered()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_caller_link(backend: VchanBackend, domain: int, port: int, *,
                           accept_timeout: float, handshake_timeout: float,
                           ring: int = DATA_RING_SIZE) -> FramedLink:
    """Serve a data vchan as a call's caller does, take its peer and exchange HELLOs.

    The caller of a call is the vchan's server (wire-protocol.md §6): dom0's
    client, or an agent serving its own VM's call. The link's stream is the
    caller's to close.
    """
    vchan = await backend.serve_one(domain, port, timeout=accept_timeout, read_min=ring,
                                    write_min=ring)
    link = FramedLink(vchan, Direction.SERVICE_TO_CALLER)
    try:
        with trio.fail_after(handshake_timeout):
            await link.exchange_hello(PROTOCOL_VERSION, send_first=True)
    except BaseException:
        with trio.CancelScope(shield=True):
            await vchan.aclose()
        raise
    return link
