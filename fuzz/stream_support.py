"""What the two stream harnesses share: driving a MessageReader as a role would.

Not a harness itself. The harnesses import it as a plain module (their own
directory is on ``sys.path`` when they run as scripts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from qrexec_trio.protocol import (
    Direction,
    Message,
    MessageReader,
    MsgType,
    ProtocolError,
    decode_hello,
    negotiate_version,
)


class Finding(AssertionError):
    """An invariant of the protocol layer does not hold: a bug, not bad input."""


def require(condition: bool, what: str) -> None:
    # Not ``assert``: the harnesses must keep checking under ``python -O``.
    if not condition:
        raise Finding(what)


@dataclass
class ReadOutcome:
    """Everything a reader produced for one input, for comparing two feeding schedules."""

    messages: list[Message] = field(default_factory=list)
    version: int | None = None
    error: str | None = None
    clean_eof: bool = False


@dataclass(frozen=True)
class StreamSetup:
    """How the harness's first byte set up the reader."""

    own_version: int
    hello_already_done: bool
    piece_size: int


def read_stream(
    direction: Direction,
    stream: bytes,
    setup: StreamSetup,
    piece_size: int,
    on_message: Callable[[Message, int], None],
) -> ReadOutcome:
    """Feed ``stream`` in pieces of ``piece_size``, as a role's receive loop would.

    The HELLO is negotiated against ``setup.own_version`` the way the roles do
    it; ``on_message`` sees every other message with the version in force.
    A :class:`ProtocolError` ends the stream, as it ends a real connection.
    """
    version = setup.own_version if setup.hello_already_done else None
    reader = MessageReader(direction, version)
    outcome = ReadOutcome(version=version)
    saw_hello = False

    def drain() -> None:
        nonlocal saw_hello
        while (message := reader.next_message()) is not None:
            outcome.messages.append(message)
            if message.type == MsgType.HELLO:
                require(not saw_hello and reader.version is None, "a second HELLO got through")
                saw_hello = True
                reader.version = negotiate_version(
                    setup.own_version, decode_hello(message.payload)
                )
                outcome.version = reader.version
                continue
            require(reader.version is not None or not direction.has_hello,
                    "a message got through before the HELLO")
            on_message(message, reader.version if reader.version is not None else 4)

    try:
        for start in range(0, len(stream), piece_size):
            reader.feed(stream[start : start + piece_size])
            drain()
        reader.feed_eof()
        drain()
    except ProtocolError as error:
        outcome.error = str(error)
        return outcome
    outcome.clean_eof = reader.at_clean_eof
    require(outcome.clean_eof, "end of stream neither clean nor an error")
    consumed = sum(8 + len(m.payload) for m in outcome.messages)
    require(consumed == len(stream), "bytes consumed do not add up to the stream")
    return outcome


def read_both_ways(
    direction: Direction,
    stream: bytes,
    setup: StreamSetup,
    on_message: Callable[[Message, int], None],
) -> ReadOutcome:
    """Read in small pieces and in one piece; the two must agree exactly."""
    chunked = read_stream(direction, stream, setup, setup.piece_size, on_message)
    whole = read_stream(direction, stream, setup, max(len(stream), 1), lambda _m, _v: None)
    require(chunked == whole, f"split feeding changed the outcome: {chunked} != {whole}")
    return chunked


def setup_from(control: int, versions: tuple[int, ...]) -> StreamSetup:
    """Bits 0-1 pick the version, bit 2 skips the HELLO, bits 3-7 the piece size."""
    return StreamSetup(
        own_version=versions[(control & 3) % len(versions)],
        hello_already_done=bool(control & 4),
        piece_size=(control >> 3) + 1,
    )
