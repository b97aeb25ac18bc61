"""MessageReader and per-direction validation (wire-protocol.md §1, §3, §5, §11).

The reader frames and checks headers (type allowed on this link, length in
bounds) before it buffers a payload, then hands out typed events. A broken
frame is fatal (RemoteProtocolError, the stream is out of step); a
well-framed message with a bad payload is not (UndecodableMessage).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec_trio.protocol import (
    ConnectionTerminated,
    Data,
    Direction,
    Event,
    ExecCmdline,
    ExitCode,
    Hello,
    JustExec,
    LocalProtocolError,
    Message,
    MessageReader,
    MsgType,
    PortAssigned,
    RemoteProtocolError,
    ServiceConnect,
    ServiceRefused,
    Stream,
    TriggerAnswer,
    TriggerService,
    UndecodableMessage,
    check_header,
    encode_frame,
    negotiate_version,
    payload_bounds,
)

from .strategies import (
    U32,
    canonical_payload,
    event_streams,
    events_on,
    mutated,
    relaxed,
    split_points,
    status_streams,
    triggers,
)

D = Direction
T = MsgType
INF = 1 << 32  # "any version from here on"
CHUNK = -1  # "the data chunk limit of the negotiated version"

# Who may send what, and with which payload length, written out from the
# specification (not from the implementation's tables): direction ->
# type -> (lowest version, highest version + 1, min len, max len).
ALLOWED: dict[Direction, dict[int, tuple[int, int, int, int]]] = {
    D.DAEMON_TO_AGENT: {
        T.EXEC_CMDLINE: (2, INF, 9, 65535),
        T.JUST_EXEC: (2, INF, 9, 65535),
        T.SERVICE_CONNECT: (2, INF, 40, 40),
        T.SERVICE_REFUSED: (2, INF, 32, 32),
    },
    D.AGENT_TO_DAEMON: {
        T.CONNECTION_TERMINATED: (2, INF, 8, 8),
        T.TRIGGER_SERVICE: (2, 3, 128, 128),
        T.TRIGGER_SERVICE3: (3, INF, 97, 96 + 65000),
        T.TRIGGER_SERVICE4: (4, INF, 161, 160 + 65000),
    },
    D.CLIENT_TO_DAEMON: {
        T.EXEC_CMDLINE: (2, INF, 9, 65535),
        T.JUST_EXEC: (2, INF, 9, 65535),
        T.SERVICE_CONNECT: (2, INF, 9, 65535),
    },
    D.DAEMON_TO_CLIENT: {
        T.EXEC_CMDLINE: (2, INF, 8, 8),
        T.JUST_EXEC: (2, INF, 8, 8),
        T.SERVICE_CONNECT: (2, INF, 8, 8),
    },
    D.CALLER_TO_SERVICE: {T.DATA_STDIN: (2, INF, 0, CHUNK)},
    D.SERVICE_TO_CALLER: {
        T.DATA_STDOUT: (2, INF, 0, CHUNK),
        T.DATA_STDERR: (2, INF, 0, CHUNK),
        T.DATA_EXIT_CODE: (2, INF, 0, CHUNK),
    },
    D.CLIENT_VM_TO_AGENT: {T.TRIGGER_SERVICE4: (2, INF, 161, 160 + 65000)},
    # Our own status channel: non-empty stderr chunks, then a 4-byte exit code
    # or a 32-byte refusal. It has no version: the chunk limit is v3's.
    D.AGENT_TO_CLIENT_VM: {
        T.DATA_STDERR: (2, INF, 1, 65536),
        T.DATA_EXIT_CODE: (2, INF, 4, 4),
        T.SERVICE_REFUSED: (2, INF, 32, 32),
    },
}
CHUNK_LIMIT = {2: 4096, 3: 65536, 4: 65536}
LOCAL_LINKS = [D.CLIENT_VM_TO_AGENT, D.AGENT_TO_CLIENT_VM]
HELLO_DIRECTIONS = [d for d in Direction if d not in LOCAL_LINKS]


def expected_bounds(direction: Direction, msg_type: int, version: int) -> tuple[int, int] | None:
    rule = ALLOWED[direction].get(msg_type)
    if rule is None:
        return None
    low_version, end_version, low, high = rule
    if not low_version <= version < end_version:
        return None
    return (low, CHUNK_LIMIT[version] if high == CHUNK else high)


def hello(version: int = 4) -> bytes:
    return Hello(version).encode()


def read_all(reader: MessageReader, data: bytes) -> list[Event]:
    reader.feed(data)
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    return events


def negotiated(direction: Direction, version: int) -> MessageReader:
    """A reader past the HELLO exchange, driven as a role would drive it."""
    reader = MessageReader(direction)
    if direction.has_hello:
        [event] = read_all(reader, hello(version))
        assert isinstance(event, Hello)
        reader.version = negotiate_version(4, event.version)
    return reader


def fatal(reader: MessageReader) -> RemoteProtocolError:
    """The reader's error for a broken frame: fatal, not a skippable bad payload."""
    with pytest.raises(RemoteProtocolError) as error:
        reader.next_event()
    assert not isinstance(error.value, UndecodableMessage)
    return error.value


# -- the per-direction table ---------------------------------------------------------------


ALL_TYPES = sorted(set(T) | {0, 0x18F, 0x194, 0x1FF, 0x204, 0x20F, 0x214, 0x2FF, 0x301})


@pytest.mark.parametrize("version", [2, 3, 4])
@pytest.mark.parametrize("direction", list(Direction))
def test_payload_bounds_match_the_specification(direction: Direction, version: int) -> None:
    for msg_type in ALL_TYPES:
        want = None if msg_type == T.HELLO else expected_bounds(direction, msg_type, version)
        assert payload_bounds(direction, msg_type, version) == want, hex(msg_type)


@pytest.mark.parametrize("version", [2, 3, 4])
@pytest.mark.parametrize("direction", list(Direction))
def test_check_header_enforces_types_and_lengths(direction: Direction, version: int) -> None:
    for msg_type in ALL_TYPES:
        bounds = None if msg_type == T.HELLO else expected_bounds(direction, msg_type, version)
        if bounds is None:
            for length in (0, 4, 8, 40):
                with pytest.raises(RemoteProtocolError) as error:
                    check_header(direction, msg_type, length, version)
                assert error.value.field == "header.type"
            continue
        low, high = bounds
        check_header(direction, msg_type, low, version)
        check_header(direction, msg_type, high, version)
        for length in (low - 1, high + 1, 0xFFFFFFFF):
            if length < 0:
                continue
            with pytest.raises(RemoteProtocolError) as error:
                check_header(direction, msg_type, length, version)
            assert error.value.field == "header.len"


@relaxed
@given(st.sampled_from(list(Direction)), st.sampled_from([2, 3, 4]), U32, U32)
def test_unknown_types_always_rejected(
    direction: Direction, version: int, msg_type: int, length: int
) -> None:
    if msg_type in set(T):
        msg_type = 0x1000 + msg_type
    with pytest.raises(RemoteProtocolError) as error:
        check_header(direction, msg_type, length, version)
    assert error.value.field == "header.type"


@pytest.mark.parametrize(
    ("direction", "version", "msg_type", "length"),
    [
        pytest.param(D.CALLER_TO_SERVICE, 4, T.DATA_STDOUT, 5, id="stdout-from-caller"),
        pytest.param(D.CALLER_TO_SERVICE, 4, T.DATA_EXIT_CODE, 4, id="exit-from-caller"),
        pytest.param(D.SERVICE_TO_CALLER, 4, T.DATA_STDIN, 5, id="stdin-from-service"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.EXEC_CMDLINE, 20, id="exec-from-agent"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.SERVICE_CONNECT, 40, id="connect-from-agent"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.SERVICE_REFUSED, 32, id="refused-from-agent"),
        pytest.param(D.AGENT_TO_DAEMON, 2, T.TRIGGER_SERVICE3, 100, id="trigger3-on-v2"),
        pytest.param(D.AGENT_TO_DAEMON, 3, T.TRIGGER_SERVICE4, 170, id="trigger4-on-v3"),
        pytest.param(D.AGENT_TO_DAEMON, 3, T.TRIGGER_SERVICE, 128, id="trigger2-on-v3"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.TRIGGER_SERVICE, 128, id="trigger2-on-v4"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.DATA_STDOUT, 1, id="data-on-control"),
        pytest.param(D.DAEMON_TO_AGENT, 4, T.TRIGGER_SERVICE4, 170, id="trigger-from-daemon"),
        pytest.param(D.DAEMON_TO_AGENT, 4, T.CONNECTION_TERMINATED, 8, id="terminated-to-agent"),
        pytest.param(D.CLIENT_TO_DAEMON, 3, T.SERVICE_REFUSED, 32, id="refused-from-client"),
        pytest.param(D.CLIENT_TO_DAEMON, 3, T.TRIGGER_SERVICE3, 100, id="trigger-from-client"),
        pytest.param(D.DAEMON_TO_CLIENT, 3, T.DATA_STDOUT, 1, id="data-to-client"),
        pytest.param(D.CLIENT_VM_TO_AGENT, 4, T.TRIGGER_SERVICE3, 100, id="old-client-vm"),
        pytest.param(D.CLIENT_VM_TO_AGENT, 4, T.EXEC_CMDLINE, 20, id="exec-from-client-vm"),
        pytest.param(D.AGENT_TO_CLIENT_VM, 4, T.DATA_STDOUT, 1, id="stdout-on-status"),
        pytest.param(D.AGENT_TO_CLIENT_VM, 4, T.SERVICE_CONNECT, 40, id="connect-on-status"),
    ],
)
def test_type_in_the_wrong_direction_rejected(
    direction: Direction, version: int, msg_type: int, length: int
) -> None:
    reader = negotiated(direction, version)
    reader.feed(encode_frame(msg_type, bytes(length)))
    error = fatal(reader)
    assert error.field == "header.type"
    assert "may not be sent" in error.rule


# -- HELLO rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("direction", HELLO_DIRECTIONS)
def test_hello_must_come_first(direction: Direction) -> None:
    some_allowed = next(iter(ALLOWED[direction]))
    low = ALLOWED[direction][some_allowed][2]
    reader = MessageReader(direction)
    reader.feed(encode_frame(some_allowed, bytes(low)))
    error = fatal(reader)
    assert (error.field, "HELLO first" in error.rule) == ("header.type", True)


@pytest.mark.parametrize("direction", HELLO_DIRECTIONS)
@pytest.mark.parametrize("length", [0, 3, 5, 8, 0xFFFFFFFF])
def test_hello_length_must_be_four(direction: Direction, length: int) -> None:
    reader = MessageReader(direction)
    reader.feed(struct.pack("<II", T.HELLO, length))
    error = fatal(reader)
    assert (error.field, "4 bytes" in error.rule) == ("header.len", True)


@pytest.mark.parametrize("direction", HELLO_DIRECTIONS)
def test_hello_only_first(direction: Direction) -> None:
    reader = negotiated(direction, 4)
    reader.feed(hello(4))
    error = fatal(reader)
    assert (error.field, "HELLO not allowed" in error.rule) == ("header.type", True)


@pytest.mark.parametrize("direction", HELLO_DIRECTIONS)
@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5, 0xFFFFFFFF])
def test_hello_is_handed_out_whatever_the_version(direction: Direction, version: int) -> None:
    # The reader frames; rejecting old peers is negotiate_version's job.
    reader = MessageReader(direction)
    assert read_all(reader, hello(version)) == [Hello(version)]


@pytest.mark.parametrize("version", [None, 2, 4])
def test_trigger_socket_has_no_hello(version: int | None) -> None:
    request = TriggerService(4, b"", b"dom0", b"", b"svc")
    reader = MessageReader(D.CLIENT_VM_TO_AGENT, version)
    assert read_all(reader, request.encode()) == [request]
    reader = MessageReader(D.CLIENT_VM_TO_AGENT, version)
    reader.feed(hello())
    assert fatal(reader).field == "header.type"


def test_status_channel_has_no_hello() -> None:
    reader = MessageReader(D.AGENT_TO_CLIENT_VM)
    reader.feed(hello())
    assert fatal(reader).field == "header.type"


def test_nothing_passes_after_hello_until_the_version_is_set() -> None:
    reader = MessageReader(D.CLIENT_TO_DAEMON)
    reader.feed(hello(3) * 2)
    assert reader.next_event() == Hello(3)
    error = fatal(reader)
    assert "before a version was agreed" in error.rule


# -- buffering rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "msg_type"),
    [
        (D.SERVICE_TO_CALLER, T.DATA_STDOUT),
        (D.CALLER_TO_SERVICE, T.DATA_STDIN),
        (D.CLIENT_TO_DAEMON, T.EXEC_CMDLINE),
        (D.AGENT_TO_DAEMON, T.TRIGGER_SERVICE4),
        (D.DAEMON_TO_AGENT, T.EXEC_CMDLINE),
        (D.CLIENT_VM_TO_AGENT, T.TRIGGER_SERVICE4),
        (D.AGENT_TO_CLIENT_VM, T.DATA_STDERR),
    ],
)
def test_oversized_header_rejected_before_its_payload(
    direction: Direction, msg_type: int
) -> None:
    reader = negotiated(direction, 4)
    reader.feed(struct.pack("<II", msg_type, 1 << 30))  # 1 GiB announced, nothing sent
    error = fatal(reader)
    assert (error.field, "length" in error.rule) == ("header.len", True)


@pytest.mark.parametrize("version", [2, 3, 4])
@pytest.mark.parametrize(
    ("direction", "stream"),
    [(D.CALLER_TO_SERVICE, Stream.STDIN), (D.SERVICE_TO_CALLER, Stream.STDOUT),
     (D.SERVICE_TO_CALLER, Stream.STDERR)],
)
def test_data_chunk_limit_follows_the_version(
    direction: Direction, stream: Stream, version: int
) -> None:
    limit = CHUNK_LIMIT[version]
    reader = negotiated(direction, version)
    assert read_all(reader, Data(stream, bytes(limit)).encode()) == [Data(stream, bytes(limit))]
    reader.feed(struct.pack("<II", stream, limit + 1))
    assert fatal(reader).field == "header.len"


def test_version_negotiated_down_to_two_limits_chunks_to_4096() -> None:
    reader = MessageReader(D.SERVICE_TO_CALLER)
    [event] = read_all(reader, hello(2))
    assert isinstance(event, Hello)
    reader.version = negotiate_version(4, event.version)
    reader.feed(struct.pack("<II", T.DATA_STDOUT, 4097))
    error = fatal(reader)
    assert (error.field, "4097" in error.rule) == ("header.len", True)


def test_bytes_wanted_tracks_the_message_in_progress() -> None:
    reader = negotiated(D.SERVICE_TO_CALLER, 4)
    header = struct.pack("<II", T.DATA_STDOUT, 100)
    assert reader.bytes_wanted() == 8
    reader.feed(header[:3])
    assert reader.bytes_wanted() == 5
    reader.feed(header[3:])
    assert reader.next_event() is None
    assert reader.bytes_wanted() == 100
    reader.feed(b"x" * 60)
    assert reader.next_event() is None
    assert reader.bytes_wanted() == 40
    reader.feed(b"x" * 40)
    assert reader.next_event() == Data(Stream.STDOUT, b"x" * 100)
    assert reader.buffered == 0


def test_raw_frames_are_still_available() -> None:
    # For the framing layer's own users (fuzzers, relays): the frame before decoding.
    reader = negotiated(D.AGENT_TO_DAEMON, 4)
    reader.feed(ConnectionTerminated(0, 513).encode())
    assert reader.next_message() == Message(T.CONNECTION_TERMINATED, struct.pack("<II", 0, 513))


def test_take_buffered_hands_over_what_came_after_the_hello() -> None:
    reader = MessageReader(D.SERVICE_TO_CALLER)
    reader.feed(hello(4) + b"raw bytes")
    assert reader.next_event() == Hello(4)
    assert reader.take_buffered() == b"raw bytes"
    reader = negotiated(D.SERVICE_TO_CALLER, 4)
    reader.feed(struct.pack("<II", T.DATA_STDOUT, 5))
    assert reader.next_event() is None
    with pytest.raises(LocalProtocolError):
        reader.take_buffered()


def test_data_after_eof_is_a_local_error() -> None:
    reader = MessageReader(D.SERVICE_TO_CALLER, 4)
    reader.feed_eof()
    with pytest.raises(LocalProtocolError):
        reader.feed(b"x")


def test_clean_eof_between_messages() -> None:
    reader = MessageReader(D.SERVICE_TO_CALLER, 4)
    assert read_all(reader, Data(Stream.STDOUT, b"").encode()) == [Data(Stream.STDOUT, b"")]
    assert not reader.at_clean_eof
    reader.feed_eof()
    assert reader.next_event() is None
    assert reader.at_clean_eof


def test_reader_stays_failed_after_an_error() -> None:
    reader = MessageReader(D.CLIENT_TO_DAEMON, version=3)
    reader.feed(encode_frame(0x777, b"payload that must not be read as a header"))
    first = fatal(reader)
    with pytest.raises(RemoteProtocolError) as again:
        reader.next_event()
    assert again.value is first
    with pytest.raises(RemoteProtocolError) as raw:
        reader.next_message()
    assert raw.value is first


# -- a bad payload in a good frame: refused, the stream still in step --------------------------


GOOD_AFTER: dict[Direction, Event] = {
    D.AGENT_TO_DAEMON: ConnectionTerminated(0, 513),
    D.DAEMON_TO_AGENT: ExecCmdline(0, 513, b"u:x"),
    D.CLIENT_TO_DAEMON: ServiceConnect(0, 513, b"SOCKET1"),
    D.CLIENT_VM_TO_AGENT: TriggerService(4, b"", b"dom0", b"", b"svc"),
}


@pytest.mark.parametrize(
    ("direction", "bad", "field", "raw_request_id"),
    [
        pytest.param(D.AGENT_TO_DAEMON,
                     encode_frame(T.TRIGGER_SERVICE4, bytes(64) + b"dom0".ljust(64, b"\0")
                                  + b"SOCKET13".ljust(32, b"\0") + b"../../bin/sh\0"),
                     "trigger.service_name", b"SOCKET13".ljust(32, b"\0"), id="trigger"),
        pytest.param(D.AGENT_TO_DAEMON,
                     encode_frame(T.TRIGGER_SERVICE3, b"dom0".ljust(64, b"\0")
                                  + b"\xffSOCK".ljust(32, b"\1") + b"svc\0"),
                     "request_id", b"\xffSOCK".ljust(32, b"\1"), id="trigger-bad-id"),
        pytest.param(D.DAEMON_TO_AGENT, encode_frame(T.SERVICE_CONNECT, bytes(8) + b"x" * 32),
                     "request_id", None, id="service-connect"),
        pytest.param(D.DAEMON_TO_AGENT, encode_frame(T.EXEC_CMDLINE, bytes(8) + b"u:cmd"),
                     "exec_params.cmdline", None, id="exec-no-nul"),
        pytest.param(D.CLIENT_TO_DAEMON, encode_frame(T.JUST_EXEC, bytes(8) + b"u\0:x\0"),
                     "exec_params.cmdline", None, id="just-exec-interior-nul"),
        pytest.param(D.CLIENT_VM_TO_AGENT,
                     encode_frame(T.TRIGGER_SERVICE4, bytes(64) + b"a/b".ljust(64, b"\0")
                                  + b"SOCKET".ljust(32, b"\0") + b"svc\0"),
                     "trigger.target", b"SOCKET".ljust(32, b"\0"), id="client-vm-trigger"),
    ],
)
def test_undecodable_message_keeps_the_stream_in_step(
    direction: Direction, bad: bytes, field: str, raw_request_id: bytes | None
) -> None:
    good = GOOD_AFTER[direction]
    reader = negotiated(direction, 4)
    # In one piece: the bad message is consumed exactly, the next one is read.
    reader.feed(bad + good.encode())
    with pytest.raises(UndecodableMessage) as error:
        reader.next_event()
    assert (error.value.field, error.value.msg_type) == (field, struct.unpack_from("<I", bad)[0])
    assert error.value.raw_request_id == raw_request_id
    assert reader.next_event() == good
    reader.feed_eof()
    assert reader.next_event() is None
    assert reader.at_clean_eof


# -- streams: every event through the reader, in any split ------------------------------------


def drive(direction: Direction, pieces: list[bytes]) -> list[Event]:
    """Feed ``pieces`` one by one, negotiating after HELLO as a role does."""
    reader = MessageReader(direction)
    events: list[Event] = []
    for piece in pieces:
        reader.feed(piece)
        while (event := reader.next_event()) is not None:
            if isinstance(event, Hello):
                reader.version = negotiate_version(4, event.version)
            events.append(event)
    reader.feed_eof()
    assert reader.next_event() is None
    assert reader.at_clean_eof
    assert reader.buffered == 0
    return events


StreamCase = tuple[Direction, list[Event]]
streams: st.SearchStrategy[StreamCase] = st.sampled_from(list(Direction)).flatmap(
    lambda d: event_streams(d).map(lambda case: (d, case[1]))
)


def wire_of(events: list[Event]) -> bytes:
    return b"".join(event.encode() for event in events)


@relaxed
@given(streams)
def test_stream_in_one_piece(stream: StreamCase) -> None:
    direction, events = stream
    assert drive(direction, [wire_of(events)]) == events


@relaxed
@given(streams)
def test_stream_byte_by_byte(stream: StreamCase) -> None:
    direction, events = stream
    wire = wire_of(events)
    assert drive(direction, [wire[i : i + 1] for i in range(len(wire))]) == events


@relaxed
@given(streams.flatmap(lambda s: st.tuples(st.just(s), split_points(wire_of(s[1])))))
def test_stream_in_random_pieces(case: tuple[StreamCase, list[bytes]]) -> None:
    (direction, events), pieces = case
    assert b"".join(pieces) == wire_of(events)
    assert drive(direction, pieces) == events


@pytest.mark.parametrize("direction", list(Direction))
@relaxed
@given(data=st.data())
def test_each_event_alone_in_random_pieces(direction: Direction, data: st.DataObject) -> None:
    version = data.draw(st.sampled_from([2, 3, 4]))
    event = data.draw(events_on(direction, version))
    frame = event.encode()
    reader = MessageReader(direction, version)
    got = []
    for piece in data.draw(split_points(frame)):
        reader.feed(piece)
        while (out := reader.next_event()) is not None:
            got.append(out)
    assert got == [event]
    assert reader.buffered == 0


@relaxed
@given(streams.flatmap(lambda s: st.tuples(st.just(s), st.integers(0, len(wire_of(s[1]))))))
def test_truncated_stream_rejected_at_eof(case: tuple[StreamCase, int]) -> None:
    (direction, events), cut = case
    wire = wire_of(events)
    boundaries = [0]
    for event in events:
        boundaries.append(boundaries[-1] + len(event.encode()))
    reader = MessageReader(direction)
    got: list[Event] = []
    reader.feed(wire[:cut])
    reader.feed_eof()

    def read() -> None:
        while (event := reader.next_event()) is not None:
            if isinstance(event, Hello):
                reader.version = negotiate_version(4, event.version)
            got.append(event)

    if cut in boundaries:
        read()
        assert got == events[: boundaries.index(cut)]
        assert reader.at_clean_eof
    else:
        with pytest.raises(RemoteProtocolError, match="stream ended") as error:
            read()
        assert not isinstance(error.value, UndecodableMessage)
        assert got == [e for i, e in enumerate(events) if boundaries[i + 1] <= cut]


def _noise(wire: bytes) -> st.SearchStrategy[bytes]:
    """``wire`` with a few bytes overwritten, inserted or cut."""
    return mutated(st.just(wire))


hostile_input = st.one_of(
    st.tuples(st.sampled_from(list(Direction)), st.binary(max_size=400)),
    streams.flatmap(lambda s: st.tuples(st.just(s[0]), _noise(wire_of(s[1])))),
)


@relaxed
@given(hostile_input, st.sampled_from([None, 2, 3, 4]), st.integers(1, 64))
def test_reader_raises_only_remote_protocol_errors(
    case: tuple[Direction, bytes], version: int | None, piece: int
) -> None:
    """Whatever the peer sends: events, skippable bad payloads, or one fatal error.

    And every event is exactly its frame: it encodes back to the bytes it came
    from (but for the two documented rules of canonical_payload).
    """
    direction, data = case
    reader = MessageReader(direction, version)
    fed = end = 0
    try:
        for start in [*range(0, len(data), piece), len(data)]:
            if start < len(data):
                reader.feed(data[start : start + piece])
                fed = min(start + piece, len(data))
            else:
                reader.feed_eof()
            while True:
                try:
                    event = reader.next_event()
                except UndecodableMessage as error:
                    frame, end = data[end : fed - reader.buffered], fed - reader.buffered
                    assert error.msg_type == struct.unpack_from("<I", frame)[0]
                    continue
                if event is None:
                    break
                frame, end = data[end : fed - reader.buffered], fed - reader.buffered
                assert event.encode() == encode_frame(
                    event.msg_type, canonical_payload(direction, event.msg_type, frame[8:]))
                if isinstance(event, Hello):
                    reader.version = max(2, min(4, event.version))
    except RemoteProtocolError as error:
        assert not isinstance(error, UndecodableMessage)
        with pytest.raises(RemoteProtocolError) as again:
            reader.next_event()
        assert again.value is error
        return
    assert reader.at_clean_eof
    assert end == len(data)


# -- the status channel (agent -> qrexec-client-vm) --------------------------------------------


def read_status(data: bytes, *, piece: int = 1) -> list[Event]:
    """Read a status channel to its end as qrexec-client-vm does (in small pieces)."""
    reader = MessageReader(D.AGENT_TO_CLIENT_VM)
    got = []
    for start in range(0, len(data), piece):
        reader.feed(data[start : start + piece])
        while (event := reader.next_event()) is not None:
            got.append(event)
    reader.feed_eof()
    assert reader.next_event() is None
    assert reader.at_clean_eof
    return got


@relaxed
@given(status_streams(), st.integers(1, 16))
def test_status_channel_grammar_accepts_every_valid_channel(events: list[Event],
                                                            piece: int) -> None:
    assert read_status(wire_of(events), piece=piece) == events


@relaxed
@given(status_streams().filter(lambda s: bool(s) and not isinstance(s[-1], Data)),
       events_on(D.AGENT_TO_CLIENT_VM))
def test_status_channel_refuses_any_message_after_the_final_one(
    events: list[Event], late: Event
) -> None:
    with pytest.raises(RemoteProtocolError, match="after the final one") as error:
        read_status(wire_of(events) + late.encode())
    assert error.value.field == "header"


def test_status_channel_refuses_even_a_partial_header_after_the_final_one() -> None:
    reader = MessageReader(D.AGENT_TO_CLIENT_VM)
    reader.feed(ExitCode(0).encode() + b"\x92\x01")
    assert reader.next_event() == ExitCode(0)
    reader.feed_eof()
    with pytest.raises(RemoteProtocolError, match="inside a message header"):
        reader.next_event()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param(encode_frame(T.DATA_STDERR, b""), "header.len", id="empty-stderr"),
        pytest.param(encode_frame(T.DATA_STDERR, bytes(65537)), "header.len", id="big-stderr"),
        pytest.param(encode_frame(T.DATA_EXIT_CODE, b"\0\0\0"), "header.len", id="exit-3"),
        pytest.param(encode_frame(T.DATA_EXIT_CODE, b"\0\0\0\0\0"), "header.len", id="exit-5"),
        pytest.param(encode_frame(T.SERVICE_REFUSED, bytes(31)), "header.len", id="refused-31"),
        pytest.param(encode_frame(T.SERVICE_REFUSED, bytes(33)), "header.len", id="refused-33"),
        pytest.param(encode_frame(T.DATA_STDOUT, b"x"), "header.type", id="stdout"),
        pytest.param(encode_frame(T.DATA_STDIN, b"x"), "header.type", id="stdin"),
        pytest.param(hello(), "header.type", id="hello"),
        pytest.param(Data(Stream.STDERR, b"e").encode() + encode_frame(T.DATA_STDERR, b""),
                     "header.len", id="empty-stderr-after-stderr"),
    ],
)
def test_status_channel_refuses_what_the_grammar_does_not_allow(data: bytes, field: str) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        read_status(data)
    assert error.value.field == field
    assert not isinstance(error.value, UndecodableMessage)


def test_status_channel_stderr_chunk_limit_is_v3s() -> None:
    assert read_status(Data(Stream.STDERR, bytes(65536)).encode(), piece=4096) == [
        Data(Stream.STDERR, bytes(65536))]


def test_status_channel_refusal_with_a_bad_id_is_final_and_undecodable() -> None:
    reader = MessageReader(D.AGENT_TO_CLIENT_VM)
    reader.feed(encode_frame(T.SERVICE_REFUSED, b"1/2".ljust(32, b"\0"))
                + Data(Stream.STDERR, b"late").encode())
    with pytest.raises(UndecodableMessage) as error:
        reader.next_event()
    assert error.value.field == "request_id"
    # It was still the final message: nothing may follow it.
    with pytest.raises(RemoteProtocolError, match="after the final one"):
        reader.next_event()


# -- golden transcripts of the reference implementation ------------------------------------------

# Where the project's other vector tests look (tests/vectors.py): $QREXEC_VECTORS,
# else the copy in the repository, tests/data/vectors. A missing folder fails, never skips.
VECTORS = Path(
    os.environ.get("QREXEC_VECTORS")
    or Path(__file__).resolve().parents[1] / "data" / "vectors"
)
TRANSCRIPTS = ["a-dom0-to-vm-command", "b-dom0-to-vm-rpc", "c-just-exec",
               "d1-service-not-found", "d2-service-not-executable", "e1-vm-to-dom0-allow",
               "e2-vm-to-dom0-deny", "e3-vm-to-dom0-stderr", "f-vm-to-vm",
               "g-killed-by-signal", "h-stdin-closed-early", "h2-stdin-open-at-exit",
               "i1-socket-service", "i2-socket-skip-descriptor",
               "i3-socket-exit-on-service-eof", "j1-tcp-service", "j2-tcp-port-from-arg",
               "j3-tcp-unexpected-arg", "k-stdio-socket-sigusr1",
               "k2-stdio-socket-sigusr1-late-stdin", "l-wait-for-session",
               "m-invalid-rpc-config", "o-stdin-256k-before-read"]
#: Records that are not qrexec frames: notes, the trigger socket's unframed
#: answer, a local service's socket, a service's log file.
NOT_FRAMES = ("event", "raw", "log")


def _direction(link: str, sender: str, types: set[int]) -> Direction:
    if link == "control":
        return D.AGENT_TO_DAEMON if sender.startswith("agent") else D.DAEMON_TO_AGENT
    if link == "client-socket":
        return D.DAEMON_TO_CLIENT if sender.startswith("daemon:") and "/" not in sender \
            else D.CLIENT_TO_DAEMON
    if link == "client-vm-socket":
        return D.CLIENT_VM_TO_AGENT
    return D.CALLER_TO_SERVICE if T.DATA_STDIN in types else D.SERVICE_TO_CALLER


def _transcript_streams(path: Path) -> dict[tuple[str, str, str], list[dict[str, object]]]:
    streams: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["type"] in NOT_FRAMES:
            continue
        where = record.get("vchan") or f"{record.get('socket')}#{record.get('conn')}"
        key = (record["link"], str(where), record["from"])
        streams.setdefault(key, []).append(record)
    return streams


def _as_recorded(event: Event, direction: Direction) -> dict[str, object] | None:
    """``event`` in the vectors' own "decoded" notation (None: compare nothing)."""
    match event:
        case Hello(version):
            return {"version": version}
        case ExecCmdline(domain, port, cmdline) | JustExec(domain, port, cmdline):
            return {"connect_domain": domain, "connect_port": port, "cmdline": cmdline.decode()}
        case PortAssigned(_, domain, port):
            return {"connect_domain": domain, "connect_port": port, "reply": True}
        case ServiceConnect(domain, port, request_id):
            return {"connect_domain": domain, "connect_port": port,
                    "ident": request_id.decode()}
        case ServiceRefused(request_id):
            return {"ident": request_id.decode()}
        case ConnectionTerminated(domain, port):
            return {"connect_domain": domain, "connect_port": port}
        case TriggerService(_, source, target, request_id, name):
            # The reference client writes "SOCKET" there; the agent never reads it.
            return {"source_domain": source.decode(), "target_domain": target.decode(),
                    "request_id": None if direction is D.CLIENT_VM_TO_AGENT
                    else request_id.decode(), "service_name": name.decode()}
        case Data(_, b""):
            return {"eof": True}
        case Data(_, data):
            return {"text": data.decode("utf-8", "replace")}
        case ExitCode(status):
            return {"exit_code": status}
    return None


@pytest.mark.parametrize("transcript", TRANSCRIPTS)
def test_reference_transcripts_decode_to_what_the_reference_meant(transcript: str) -> None:
    """Every stream the C programs sent each other is accepted, and each message
    decodes to the fields the capture recorded and encodes back to its bytes."""
    path = VECTORS / f"{transcript}.jsonl"
    assert path.is_file(), f"golden vector {path} missing; set QREXEC_VECTORS to its folder"
    checked = 0
    for (link, _, sender), records in _transcript_streams(path).items():
        types = {int(str(r["type"]), 16) for r in records}
        direction = _direction(link, sender, types)
        reader = MessageReader(direction)
        for record in records:
            msg_type, length = int(str(record["type"]), 16), int(str(record["len"]))
            payload = bytes.fromhex(str(record["payload_hex"]))
            whole = len(payload) == length
            # Large data payloads are stored abbreviated; their length is what matters then.
            payload = payload.ljust(length, b"x")
            reader.feed(encode_frame(msg_type, payload))
            event = reader.next_event()
            assert event is not None, record["seq"]
            assert event.msg_type == msg_type
            assert event.encode() == encode_frame(
                msg_type, canonical_payload(direction, msg_type, payload))
            if whole:
                recorded = dict(record["decoded"])  # type: ignore[call-overload]
                if isinstance(event, TriggerService) and direction is D.CLIENT_VM_TO_AGENT:
                    assert (event.request_id, recorded["request_id"]) == (b"", "SOCKET")
                    recorded["request_id"] = None
                if isinstance(event, Data) and "text" in recorded:
                    assert event.data.decode("utf-8", "replace") == recorded["text"]
                assert _as_recorded(event, direction) == recorded, record["seq"]
            if isinstance(event, Hello):
                ours = 3 if "socket" in link else 4
                reader.version = negotiate_version(ours, event.version)
            checked += 1
        assert reader.next_event() is None
        reader.feed_eof()
        assert reader.next_event() is None
        assert reader.at_clean_eof, (transcript, link, sender)
    assert checked >= 5  # at least the control HELLOs, a request and its answer


@pytest.mark.parametrize("transcript", ["e1-vm-to-dom0-allow", "f-vm-to-vm"])
def test_reference_trigger_answer_decodes(transcript: str) -> None:
    """The agent's unframed 8-byte answer on the trigger socket, as captured."""
    answers = [json.loads(line) for line in (VECTORS / f"{transcript}.jsonl").read_text()
               .splitlines() if '"raw"' in line and "client-vm-socket" in line]
    assert answers
    for record in answers:
        raw = bytes.fromhex(record["payload_hex"])
        answer = TriggerAnswer.decode(raw)
        assert {"connect_domain": answer.connect_domain,
                "connect_port": answer.connect_port} == record["decoded"]
        assert answer.encode() == raw


def test_every_vector_file_is_replayed() -> None:
    assert sorted(p.stem for p in VECTORS.glob("*.jsonl")) == sorted(TRANSCRIPTS)


def test_service_connect_stream_round_trip() -> None:
    reader = negotiated(D.CLIENT_TO_DAEMON, 3)
    assert read_all(reader, ServiceConnect(0, 0, b"SOCKET13").encode()) == [
        ServiceConnect(0, 0, b"SOCKET13")]
    reply = negotiated(D.DAEMON_TO_CLIENT, 3)
    assert read_all(reply, PortAssigned(T.SERVICE_CONNECT, 42, 513).encode()) == [
        PortAssigned(T.SERVICE_CONNECT, 42, 513)]


def test_agent_to_daemon_refusal_by_raw_id_reaches_the_agent_as_sent() -> None:
    # The daemon refuses an undecodable trigger by the id field as the VM sent it.
    reader = negotiated(D.AGENT_TO_DAEMON, 4)
    reader.feed(encode_frame(T.TRIGGER_SERVICE4, bytes(64) + b"dom0".ljust(64, b"\0")
                             + b"SOCKET9".ljust(32, b"\0") + b"bad/name\0"))
    with pytest.raises(UndecodableMessage) as error:
        reader.next_event()
    assert error.value.raw_request_id is not None
    refusal = ServiceRefused(b"", raw_request_id=error.value.raw_request_id)
    agent = negotiated(D.DAEMON_TO_AGENT, 4)
    assert read_all(agent, refusal.encode()) == [ServiceRefused(b"SOCKET9")]


@relaxed
@given(triggers(4))
def test_trigger_from_the_agent_reaches_the_daemon_unchanged(request: TriggerService) -> None:
    reader = negotiated(D.AGENT_TO_DAEMON, 4)
    assert read_all(reader, request.encode()) == [request]
