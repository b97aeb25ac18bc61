"""A framed link: the thin I/O driver around :class:`~qrexec_trio.protocol.MessageReader`.

It owns a stream (a vchan or a unix socket), turns received bytes into
validated messages and serialises senders, so that two tasks of one
connection can both send on it without interleaving their frames.
"""

from __future__ import annotations

from typing import Final, final

import trio

from ..protocol import (
    HEADER_SIZE,
    Direction,
    Message,
    MessageReader,
    MsgType,
    ProtocolError,
    decode_hello,
    encode_hello,
    encode_message,
    max_data_chunk,
    negotiate_version,
)
from ..xen import Vchan

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

    async def send(self, msg_type: int, payload: bytes | bytearray = b"") -> None:
        """Send one message; concurrent senders queue up, frames never interleave."""
        frame = encode_message(msg_type, payload)
        async with self._send_lock:
            await self.stream.send_all(frame)

    async def receive(self) -> Message | None:
        """The next message, or ``None`` if the peer closed between messages.

        Raises :class:`ProtocolError` for anything the peer may not send, and
        for a stream that ends inside a message.
        """
        while True:
            message = self._reader.next_message()
            if message is not None:
                await trio.lowlevel.checkpoint()
                return message
            if self._reader.at_clean_eof:
                await trio.lowlevel.checkpoint()
                return None
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if data:
                self._reader.feed(data)
            else:
                self._reader.feed_eof()

    async def send_hello(self, version: int) -> None:
        await self.send(MsgType.HELLO, encode_hello(version))

    async def receive_hello(self) -> int:
        """The peer's version from its HELLO (the reader insists HELLO comes first)."""
        message = await self.receive()
        if message is None:
            raise ProtocolError("hello", "peer closed before its HELLO")
        return decode_hello(message.payload)

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
