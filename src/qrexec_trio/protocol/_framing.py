"""Incremental, validating message reader (the sans-IO half of every link).

A :class:`MessageReader` is fed bytes as they arrive and hands out whole
:class:`Message` objects. It checks each header *before* buffering the
payload: a type the sender may not send, or a length outside what that type
allows, is rejected at once, so a hostile peer can never make us buffer more
than one legal message.
"""

from __future__ import annotations

import enum
from typing import Final, final

from ._constants import (
    EXEC_PARAMS_SIZE,
    HEADER_SIZE,
    MAX_QREXEC_CMD_LEN,
    MAX_SERVICE_NAME_LEN,
    SERVICE_PARAMS_SIZE,
    TRIGGER_V2_SIZE,
    TRIGGER_V3_FIXED_SIZE,
    TRIGGER_V4_FIXED_SIZE,
    MsgType,
    max_data_chunk,
)
from ._errors import ProtocolError
from ._structs import Message, decode_header


class Direction(enum.Enum):
    """A link and the direction of travel on it: who may send what."""

    DAEMON_TO_AGENT = "daemon->agent (control vchan)"
    AGENT_TO_DAEMON = "agent->daemon (control vchan)"
    CLIENT_TO_DAEMON = "client->daemon (qrexec socket)"
    DAEMON_TO_CLIENT = "daemon->client (qrexec socket)"
    CALLER_TO_SERVICE = "caller->service (data vchan)"
    SERVICE_TO_CALLER = "service->caller (data vchan)"
    CLIENT_VM_TO_AGENT = "client-vm->agent (trigger socket)"

    @property
    def has_hello(self) -> bool:
        """Every link but the trigger socket starts with a HELLO each way."""
        return self is not Direction.CLIENT_VM_TO_AGENT


_EXEC_REQUEST: Final = (EXEC_PARAMS_SIZE + 1, MAX_QREXEC_CMD_LEN)
_SERVICE_CONNECT: Final = (EXEC_PARAMS_SIZE + SERVICE_PARAMS_SIZE,) * 2
_PORT_REPLY: Final = (EXEC_PARAMS_SIZE, EXEC_PARAMS_SIZE)
_TRIGGER4: Final = (TRIGGER_V4_FIXED_SIZE + 1, TRIGGER_V4_FIXED_SIZE + MAX_SERVICE_NAME_LEN)

# Bounds that do not depend on the negotiated version.
_FIXED_BOUNDS: Final[dict[Direction, dict[int, tuple[int, int]]]] = {
    Direction.DAEMON_TO_AGENT: {
        MsgType.EXEC_CMDLINE: _EXEC_REQUEST,
        MsgType.JUST_EXEC: _EXEC_REQUEST,
        MsgType.SERVICE_CONNECT: _SERVICE_CONNECT,
        MsgType.SERVICE_REFUSED: (SERVICE_PARAMS_SIZE, SERVICE_PARAMS_SIZE),
    },
    Direction.CLIENT_TO_DAEMON: {
        MsgType.EXEC_CMDLINE: _EXEC_REQUEST,
        MsgType.JUST_EXEC: _EXEC_REQUEST,
        MsgType.SERVICE_CONNECT: _SERVICE_CONNECT,
    },
    Direction.DAEMON_TO_CLIENT: {
        MsgType.EXEC_CMDLINE: _PORT_REPLY,
        MsgType.JUST_EXEC: _PORT_REPLY,
        MsgType.SERVICE_CONNECT: _PORT_REPLY,
    },
    Direction.CLIENT_VM_TO_AGENT: {MsgType.TRIGGER_SERVICE4: _TRIGGER4},
}

# The trigger message a VM may send, by the lowest control version that allows it.
_TRIGGER_BOUNDS: Final[dict[int, tuple[range, tuple[int, int]]]] = {
    MsgType.TRIGGER_SERVICE: (range(0, 3), (TRIGGER_V2_SIZE, TRIGGER_V2_SIZE)),
    MsgType.TRIGGER_SERVICE3: (
        range(3, 1 << 32),
        (TRIGGER_V3_FIXED_SIZE + 1, TRIGGER_V3_FIXED_SIZE + MAX_SERVICE_NAME_LEN),
    ),
    MsgType.TRIGGER_SERVICE4: (range(4, 1 << 32), _TRIGGER4),
}

_DATA_TYPES: Final[dict[Direction, frozenset[int]]] = {
    Direction.CALLER_TO_SERVICE: frozenset({MsgType.DATA_STDIN}),
    Direction.SERVICE_TO_CALLER: frozenset(
        {MsgType.DATA_STDOUT, MsgType.DATA_STDERR, MsgType.DATA_EXIT_CODE}
    ),
}


def payload_bounds(direction: Direction, msg_type: int, version: int) -> tuple[int, int] | None:
    """The (min, max) payload length of ``msg_type`` sent in ``direction``.

    ``None`` means the sender may not send that type at all (at this version).
    ``version`` is the negotiated version of the link; it selects the data
    chunk limit and which trigger message a VM may send.
    """
    if direction in _FIXED_BOUNDS:
        return _FIXED_BOUNDS[direction].get(msg_type)
    if direction is Direction.AGENT_TO_DAEMON:
        if msg_type == MsgType.CONNECTION_TERMINATED:
            return _PORT_REPLY
        versions, bounds = _TRIGGER_BOUNDS.get(msg_type, (range(0), (0, 0)))
        return bounds if version in versions else None
    if msg_type in _DATA_TYPES[direction]:
        return (0, max_data_chunk(version))
    return None


def check_header(direction: Direction, msg_type: int, length: int, version: int | None) -> None:
    """Raise :class:`ProtocolError` unless this header may arrive now.

    ``version`` is ``None`` until the HELLO exchange is done: then HELLO, and
    only HELLO, is allowed (on links that have one).
    """
    if version is None and direction.has_hello:
        if msg_type != MsgType.HELLO:
            raise ProtocolError("header.type", f"expected MSG_HELLO first, got {_name(msg_type)}")
        if length != 4:
            raise ProtocolError("header.len", f"MSG_HELLO must carry 4 bytes, not {length}")
        return
    if msg_type == MsgType.HELLO:
        raise ProtocolError("header.type", f"MSG_HELLO not allowed here ({direction.value})")
    bounds = payload_bounds(direction, msg_type, version if version is not None else 4)
    if bounds is None:
        raise ProtocolError(
            "header.type", f"{_name(msg_type)} may not be sent {direction.value}"
        )
    low, high = bounds
    if not low <= length <= high:
        raise ProtocolError(
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
        self._failed: ProtocolError | None = None
        # A HELLO was handed out while no version was set: the driver must set
        # the negotiated version before anything else may arrive.
        self._hello_taken = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise ProtocolError("stream", "data after end of stream")
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
            raise ProtocolError("stream", "cannot hand over bytes in the middle of a message")
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

        Raises :class:`ProtocolError` for a bad header, or at end of stream
        in the middle of a message; once it has, it always does.
        """
        if self._failed is not None:
            raise self._failed
        try:
            return self._next_message()
        except ProtocolError as exc:
            self._failed = exc
            raise

    def _next_message(self) -> Message | None:
        if self._pending is None:
            if len(self._buffer) < HEADER_SIZE:
                if self._eof and self._buffer:
                    raise ProtocolError("header", "stream ended inside a message header")
                return None
            msg_type, length = decode_header(self._buffer[:HEADER_SIZE])
            del self._buffer[:HEADER_SIZE]
            if self.version is None and self._hello_taken:
                raise ProtocolError("header", "a message after HELLO before a version was agreed")
            check_header(self.direction, msg_type, length, self.version)
            self._pending = (msg_type, length)
        msg_type, length = self._pending
        if len(self._buffer) < length:
            if self._eof:
                raise ProtocolError(
                    "payload", f"stream ended after {len(self._buffer)} of {length} bytes"
                )
            return None
        payload = bytes(self._buffer[:length])
        del self._buffer[:length]
        self._pending = None
        if self.version is None and msg_type == MsgType.HELLO:
            self._hello_taken = True
        return Message(msg_type, payload)
