"""Incremental, validating message reader (the sans-IO half of every link).

A :class:`MessageReader` is fed bytes as they arrive and hands out typed
events (:mod:`._events`). It checks each header *before* buffering the
payload: a type the sender may not send, or a length outside what that type
allows, is rejected at once, so a hostile peer can never make us buffer more
than one legal message.
"""

from __future__ import annotations

from .._light import final
from ._bounds import payload_bounds
from ._constants import HEADER_SIZE, MsgType
from ._direction import Direction
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import Event, decode_event
from ._structs import Message, decode_header

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

#: Links on which a message of these types is the last one.
_FINAL_TYPES: Final[dict[Direction, frozenset[int]]] = {
    Direction.AGENT_TO_CLIENT_VM: frozenset({MsgType.DATA_EXIT_CODE, MsgType.SERVICE_REFUSED}),
}


def check_header(direction: Direction, msg_type: int, length: int, version: int | None) -> None:
    """Raise :class:`RemoteProtocolError` unless this header may arrive now.

    ``version`` is ``None`` until the HELLO exchange is done: then HELLO, and
    only HELLO, is allowed (on links that have one).
    """
    if version is None and direction.has_hello:
        if msg_type != MsgType.HELLO:
            raise RemoteProtocolError("header.type",
                f"expected MSG_HELLO first, got {_name(msg_type)}")
        if length != 4:
            raise RemoteProtocolError("header.len", f"MSG_HELLO must carry 4 bytes, not {length}")
        return
    if msg_type == MsgType.HELLO:
        raise RemoteProtocolError("header.type", f"MSG_HELLO not allowed here ({direction.value})")
    bounds = payload_bounds(direction, msg_type, version if version is not None else 4)
    if bounds is None:
        raise RemoteProtocolError(
            "header.type", f"{_name(msg_type)} may not be sent {direction.value}"
        )
    low, high = bounds
    if not low <= length <= high:
        raise RemoteProtocolError(
            "header.len",
            f"{_name(msg_type)} length {length} outside {low}..{high} ({direction.value})",
        )


def _name(msg_type: int) -> str:
    try:
        return f"{MsgType(msg_type).name} (0x{msg_type:x})"
    except ValueError:
        return f"unknown type 0x{msg_type:x}"


@final
class MessageReader:
    """Turns a byte stream from one sender into validated messages.

    Feed bytes with :meth:`feed`, take messages with :meth:`next_message`
    until it returns ``None``. After the HELLO exchange, set :attr:`version`
    to the negotiated version (it selects the data chunk limit).
    """

    def __init__(self, direction: Direction, version: int | None = None) -> None:
        self.direction = direction
        self.version = version
        self._buffer = bytearray()
        self._pending: tuple[int, int] | None = None  # validated header awaiting payload
        self._eof = False
        # After an error the stream is out of step (a header was consumed): every
        # later call repeats the error rather than read a payload as a header.
        self._failed: RemoteProtocolError | None = None
        # A HELLO was handed out while no version was set: the driver must set
        # the negotiated version before anything else may arrive.
        self._hello_taken = False
        # On links that end with a final message, one has been handed out.
        self._final_taken = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise LocalProtocolError("stream", "data fed after end of stream")
        self._buffer += data

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def at_clean_eof(self) -> bool:
        """The peer closed between messages (not in the middle of one)."""
        return self._eof and not self._buffer and self._pending is None

    def take_buffered(self) -> bytes:
        """Hand over the bytes received after the last whole message.

        For a relay that stops parsing after the HELLO: whatever arrived with
        the HELLO belongs to the stream it now copies. Only valid between
        messages.
        """
        if self._pending is not None:
            raise LocalProtocolError("stream", "cannot hand over bytes in the middle of a message")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def bytes_wanted(self) -> int:
        """How many more bytes complete the message in progress (for sized reads)."""
        if self._pending is None:
            return max(HEADER_SIZE - len(self._buffer), 1)
        return max(self._pending[1] - len(self._buffer), 1)

    def next_message(self) -> Message | None:
        """The next whole message, or ``None`` if more bytes are needed.

        Raises :class:`RemoteProtocolError` for a bad header, or at end of stream
        in the middle of a message; once it has, it always does.
        """
        if self._failed is not None:
            raise self._failed
        try:
            return self._next_message()
        except RemoteProtocolError as exc:
            self._failed = exc
            raise

    def _next_message(self) -> Message | None:
        if self._pending is None:
            if len(self._buffer) < HEADER_SIZE:
                if self._eof and self._buffer:
                    raise RemoteProtocolError("header", "stream ended inside a message header")
                return None
            msg_type, length = decode_header(self._buffer[:HEADER_SIZE])
            del self._buffer[:HEADER_SIZE]
            if self._final_taken:
                raise RemoteProtocolError("header", "a message after the final one")
            if self.version is None and self._hello_taken:
                raise RemoteProtocolError("header",
                    "a message after HELLO before a version was agreed")
            check_header(self.direction, msg_type, length, self.version)
            self._pending = (msg_type, length)
        msg_type, length = self._pending
        if len(self._buffer) < length:
            if self._eof:
                raise RemoteProtocolError(
                    "payload", f"stream ended after {len(self._buffer)} of {length} bytes"
                )
            return None
        payload = bytes(self._buffer[:length])
        del self._buffer[:length]
        self._pending = None
        if self.version is None and msg_type == MsgType.HELLO:
            self._hello_taken = True
        if msg_type in _FINAL_TYPES.get(self.direction, ()):
            self._final_taken = True
        return Message(msg_type, payload)

    def next_event(self) -> Event | None:
        """The next message as a typed event, or ``None`` if more bytes are needed.

        Raises :class:`RemoteProtocolError` like :meth:`next_message`, and
        :class:`~._errors.UndecodableMessage` for a well-framed message whose
        payload is bad: that message is consumed and the stream stays usable.
        """
        message = self.next_message()
        if message is None:
            return None
        return decode_event(self.direction, message.type, message.payload)
