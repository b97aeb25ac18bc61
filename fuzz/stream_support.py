"""What the two stream harnesses share: driving a MessageReader as a role would.

Not a harness itself. The harnesses import it as a plain module (their own
directory is on ``sys.path`` when they run as scripts).

The reader is fed in pieces and asked for events with ``next_event()``, as the
roles do. What it may do, whatever the input: hand out events, raise
``UndecodableMessage`` for one well-framed message with a bad payload (the
roles skip it and read on), or raise one fatal ``RemoteProtocolError`` and
then the same one forever. Anything else (another exception, a
``LocalProtocolError``) is a bug. Every event must be exactly the frame it
came from: it encodes back to those bytes, but for two documented rules
(:func:`canonical_frame`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from qrexec_trio.protocol import (
    Direction,
    Event,
    Hello,
    MessageReader,
    MsgType,
    RemoteProtocolError,
    ServiceRefused,
    UndecodableMessage,
    negotiate_version,
)


class Finding(AssertionError):
    """An invariant of the protocol layer does not hold: a bug, not bad input."""


def require(condition: bool, what: str) -> None:
    # Not ``assert``: the harnesses must keep checking under ``python -O``.
    if not condition:
        raise Finding(what)


# Restated from the specification, not imported: where each trigger keeps its id.
_ID_FIELD = {MsgType.TRIGGER_SERVICE: (96, 128), MsgType.TRIGGER_SERVICE3: (64, 96),
             MsgType.TRIGGER_SERVICE4: (128, 160)}
_HEADER = struct.Struct("<II")


def canonical_frame(direction: Direction, frame: bytes) -> bytes:
    """The bytes an event read from ``frame`` must encode to.

    The frame itself, but: an exit code is its first four bytes, or 255 when
    shorter (the reference's rule); a trigger from qrexec-client-vm has no
    request id (the agent assigns one), so that field encodes as NULs.
    """
    msg_type, _ = _HEADER.unpack_from(frame)
    payload = frame[8:]
    if msg_type == MsgType.DATA_EXIT_CODE:
        payload = payload[:4] if len(payload) >= 4 else struct.pack("<i", 255)
    elif direction is Direction.CLIENT_VM_TO_AGENT:
        payload = payload[:128] + bytes(32) + payload[160:]
    return _HEADER.pack(msg_type, len(payload)) + payload


@dataclass
class ReadOutcome:
    """Everything a reader produced for one input, for comparing two feeding schedules."""

    events: list[Event] = field(default_factory=list)
    #: (events before it, field, message type) of each well-framed message
    #: whose payload was refused.
    undecodable: list[tuple[int, str, int]] = field(default_factory=list)
    version: int | None = None
    error: str | None = None
    clean_eof: bool = False


@dataclass(frozen=True)
class StreamSetup:
    """How the harness's first byte set up the reader."""

    own_version: int
    hello_already_done: bool
    piece_size: int


class _PeerRefused(Exception):
    """The role, not the reader, ends the stream (the peer's version is too old)."""


#: What a harness checks about one event: (event, its frame, the version in force).
OnEvent = Callable[[Event, bytes, int | None], None]


def _check_undecodable(error: UndecodableMessage, frame: bytes) -> None:
    msg_type, length = _HEADER.unpack_from(frame)
    require(length == len(frame) - 8, "an undecodable message was not consumed exactly")
    require(error.msg_type == msg_type, "UndecodableMessage names another message type")
    require(bool(error.field), "UndecodableMessage names no field")
    if msg_type in _ID_FIELD:
        start, end = _ID_FIELD[msg_type]
        raw = frame[8:][start:end].ljust(32, b"\0")
        require(error.raw_request_id == raw, "raw request id is not the trigger's id field")
        # The daemon refuses the request by exactly that id: that must be sendable.
        refusal = ServiceRefused(b"", raw_request_id=error.raw_request_id).encode()
        require(refusal[8:] == raw, "refusal by raw id does not carry the id as sent")
    else:
        require(error.raw_request_id is None, "raw request id on a message that is no trigger")


def read_stream(
    direction: Direction,
    stream: bytes,
    setup: StreamSetup,
    piece_size: int,
    on_event: OnEvent,
) -> ReadOutcome:
    """Feed ``stream`` in pieces of ``piece_size``, as a role's receive loop would.

    The HELLO is negotiated against ``setup.own_version`` the way the roles do
    it; ``on_event`` sees every other event with its frame and the version in
    force. A fatal :class:`RemoteProtocolError` ends the stream, as it ends a
    real connection; an :class:`UndecodableMessage` is skipped, as the roles do.
    """
    version = setup.own_version if setup.hello_already_done else None
    reader = MessageReader(direction, version)
    outcome = ReadOutcome(version=version)
    saw_hello = False
    fed = 0  # bytes of ``stream`` fed so far
    end = 0  # where the last whole message ended

    def take_frame() -> bytes:
        nonlocal end
        start, end = end, fed - reader.buffered
        return stream[start:end]

    def drain() -> None:
        nonlocal saw_hello
        while True:
            try:
                event = reader.next_event()
            except UndecodableMessage as error:
                _check_undecodable(error, take_frame())
                outcome.undecodable.append((len(outcome.events), error.field, error.msg_type))
                continue
            if event is None:
                return
            frame = take_frame()
            require(event.encode() == canonical_frame(direction, frame),
                    f"{type(event).__name__} does not re-encode to its frame "
                    "(something was altered or dropped)")
            outcome.events.append(event)
            if isinstance(event, Hello):
                require(not saw_hello and reader.version is None, "a second HELLO got through")
                require(direction.has_hello, f"a HELLO got through {direction.value}")
                saw_hello = True
                try:
                    reader.version = negotiate_version(setup.own_version, event.version)
                except RemoteProtocolError as error:  # the role refuses the peer's version
                    raise _PeerRefused(str(error)) from None
                outcome.version = reader.version
                continue
            require(reader.version is not None or not direction.has_hello,
                    "a message got through before the HELLO")
            on_event(event, frame, reader.version)

    try:
        for start in range(0, len(stream), piece_size):
            reader.feed(stream[start : start + piece_size])
            fed = min(start + piece_size, len(stream))
            drain()
        reader.feed_eof()
        drain()
    except _PeerRefused as refused:
        outcome.error = str(refused)
        return outcome
    except RemoteProtocolError as error:
        require(not isinstance(error, UndecodableMessage), "UndecodableMessage escaped")
        outcome.error = str(error)
        try:
            reader.next_event()
        except RemoteProtocolError as again:
            require(again is error, "after a fatal error the reader raised another one")
        else:
            raise Finding("the reader went on after a fatal error")
        return outcome
    outcome.clean_eof = reader.at_clean_eof
    require(outcome.clean_eof, "end of stream neither clean nor an error")
    require(end == len(stream), "bytes consumed do not add up to the stream")
    return outcome


def read_both_ways(
    direction: Direction,
    stream: bytes,
    setup: StreamSetup,
    on_event: OnEvent,
) -> ReadOutcome:
    """Read in small pieces and in one piece; the two must agree exactly."""
    chunked = read_stream(direction, stream, setup, setup.piece_size, on_event)
    whole = read_stream(direction, stream, setup, max(len(stream), 1), lambda _e, _f, _v: None)
    require(chunked == whole, f"split feeding changed the outcome: {chunked} != {whole}")
    return chunked


def setup_from(control: int, versions: tuple[int, ...]) -> StreamSetup:
    """Bits 0-1 pick the version, bit 2 skips the HELLO, bits 3-7 the piece size."""
    return StreamSetup(
        own_version=versions[(control & 3) % len(versions)],
        hello_already_done=bool(control & 4),
        piece_size=(control >> 3) + 1,
    )
